"""Latency model per (GPU type, TP, PP): step time of one engine step from what it computes.

Both sources give coefficients in the form DistServe fits (milliseconds):

    prefill(T)        = a + b*T + c*T^2        T: tokens of one prompt
    decode(batch, K)  = A + B*K + C*batch      K: context tokens of the batch, summed

For a batch of prompts (or chunks of them) the quadratic (attention) term is summed per
sequence: c * sum(new * (cached + new)), which is c*T^2 for one whole prompt. A step that
mixes decodes and prefill chunks pays the larger fixed cost once and both marginal terms.
The whole instance is described, all pp stages, as the engine runs them: one step at a
time, cut into micro-batches that the stages work on in turn (see `step_tokens_ms`).

Sources, in order: a profile file (measured by `tandem profile`, or fitted coefficients a
user supplies) with an entry for the exact (GPU type, tp, pp); else the roofline below.

The roofline adds what each operator of each layer costs on one GPU of the instance (its
tp-th of the weights and heads), for a step of m new tokens:

    linear layers    a GEMM moves its weights (and its m rows in and out) once and does
                     2*m*n*k FLOPs. Below the ridge (about 150 tokens on A100, 300 on H100)
                     it streams weights, above it computes, and near it reaches neither roof:
                     its time is the l-3 norm of the two, so its efficiency grows with m.
    activations      norms, residual adds, rotary, attention input and output and the MLP
                     activation read and write each token's hidden state: memory bandwidth.
    attention        prefill: causal FLOPs at attention-kernel efficiency; decode: the KV read.
    tensor parallel  two all-reduces of the hidden state per layer, each a latency (NVLink or
                     PCIe) plus the ring's bytes over the GPU link.
    pipeline         the engine cuts a step into m = min(pp, sequences) micro-batches
                     (engine/parallel.py split_batch; a prompt is not cut): the first
                     goes through every stage, each later one adds the slowest stage's
                     time (the fill and drain bubble), and each crosses pp - 1 sends of
                     its hidden states. Stages do not overlap across steps.
    fixed            per step and stage (scheduling, inputs, sampling) and per layer (kernel
                     launches, the floor of small kernels): what small decode steps at high
                     TP mostly are.

The GEMM norm is not linear in m, so the coefficients are the line closest to that sum (least
squares on the relative error): prefill over prompts of 64 to 8,192 tokens; decode through the
step of one sequence, with the slope closest over batches of 1 to 512. c and B (attention)
are exact. planner/validation/ checks the operators and whole steps against published
measurements (docs/planner.md, "Validating the roofline").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from planner.latency.gpus import GPUSpec, NodeHardware
from proto.kv import DTYPE_BYTES
from proto.model_spec import ModelSpec
from proto.schema import as_int, as_list, as_number, as_str, check_keys, dump_document, load_document

# Fractions of datasheet peaks that kernels reach, and the fixed costs of a step. Sources and
# the error they leave are in docs/planner.md ("Validating the roofline").
COMPUTE_EFFICIENCY = 0.8  # large GEMMs: 86% of peak measured on A100 SXM, 80% on H100 SXM
MEMORY_EFFICIENCY = 0.85  # weights streamed by small-m GEMMs: 86-92% of HBM peak on H100
ATTENTION_EFFICIENCY = 0.6  # FlashAttention-2's forward pass: 50-73% of A100's peak
GEMM_NORM = 3.0  # a GEMM takes the l-p norm of its compute and memory times
LAYER_OVERHEAD_MS = 0.1  # kernel launches and small kernels' floor, per layer and step
STEP_OVERHEAD_MS = 1.0  # scheduling, input preparation and sampling, per step and stage
ALLREDUCE_LATENCY_MS = {True: 0.02, False: 0.05}  # an all-reduce of a small message: NVLink, PCIe
LINK_EFFICIENCY = 0.5  # NCCL all-reduces of 0.5-4 MB move about half the link's bandwidth
PREFILL_FIT_TOKENS = tuple(2**i for i in range(6, 14))  # 64 .. 8,192
DECODE_FIT_BATCHES = tuple(2**i for i in range(10))  # 1 .. 512


@dataclass(frozen=True)
class Coefficients:
    a: float  # prefill fixed ms
    b: float  # prefill ms per token
    c: float  # prefill ms per token^2 (attention)
    A: float  # decode fixed ms
    B: float  # decode ms per context token in the batch
    C: float  # decode ms per sequence in the batch
    source: str = "roofline"  # roofline | profile

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "A", "B", "C"):
            as_number(f"coefficients.{name}", getattr(self, name), minimum=0)

    def prefill_ms(self, num_tokens: float, attn_tokens2: float | None = None) -> float:
        """One step over prompts of num_tokens tokens; attn_tokens2 defaults to num_tokens^2."""
        attn = num_tokens * num_tokens if attn_tokens2 is None else attn_tokens2
        return self.a + self.b * num_tokens + self.c * attn

    def decode_ms(self, batch: float, context_tokens: float) -> float:
        return self.A + self.B * context_tokens + self.C * batch

    def step_ms(self, prefill_tokens: int, attn_tokens2: int, num_decodes: int, context_tokens: int) -> float:
        """A mixed step: decodes plus prefill chunks, paying one fixed cost."""
        fixed = max(self.a if prefill_tokens else 0.0, self.A if num_decodes else 0.0)
        return fixed + self.b * prefill_tokens + self.c * attn_tokens2 + self.B * context_tokens + self.C * num_decodes


def gemm_ms(gpu: GPUSpec, dtype: str, m: float, n: float, k: float) -> float:
    """One GEMM of [m, k] activations by [k, n] weights on one GPU."""
    flops_per_ms = gpu.peak_flops(dtype) * COMPUTE_EFFICIENCY / 1e3
    compute = 2 * m * n * k / flops_per_ms
    memory = DTYPE_BYTES[dtype] * (m * k + k * n + m * n) / _bytes_per_ms(gpu)
    return (compute**GEMM_NORM + memory**GEMM_NORM) ** (1 / GEMM_NORM)


def allreduce_ms(hw: NodeHardware, tp: int, num_bytes: float) -> float:
    """A ring all-reduce of num_bytes among tp GPUs of one node; nothing without TP."""
    if tp == 1:
        return 0.0
    ring = 2 * (tp - 1) / tp * num_bytes / (hw.link_gb_s * 1e9 * LINK_EFFICIENCY / 1e3)
    return ALLREDUCE_LATENCY_MS[hw.gpu.nvlink] + ring


def roofline(model: ModelSpec, hw: NodeHardware, tp: int, pp: int) -> Coefficients:
    """Coefficients from the GPU's peaks: the operators above, fitted to the DistServe form."""
    flops_per_ms = hw.gpu.peak_flops(model.dtype) * tp / 1e3  # refuses a device without a datasheet
    # Causal attention: 2*T^2*head_dim FLOPs per head and layer for a prompt of T tokens.
    attention = 2 * model.num_layers * model.num_heads * model.head_dim / (flops_per_ms * ATTENTION_EFFICIENCY)
    kv_read = model.kv_bytes_per_token / (_bytes_per_ms(hw.gpu) * tp)  # per context token of a decode
    a, b = _fit_line(PREFILL_FIT_TOKENS, [step_tokens_ms(model, hw, tp, pp, t, 1) for t in PREFILL_FIT_TOKENS])
    # Decode is exact for one sequence (the best TPOT an instance offers), fitted above it.
    A, C = _fit_line(
        DECODE_FIT_BATCHES, [step_tokens_ms(model, hw, tp, pp, n, n) for n in DECODE_FIT_BATCHES], through_first=True
    )
    # A decode token attends to each context token: its QK and PV, twice a prefill pair's FLOPs.
    return Coefficients(a=a, b=b, c=attention, A=A, B=kv_read + 2 * attention, C=C)


def step_tokens_ms(model: ModelSpec, hw: NodeHardware, tp: int, pp: int, num_tokens: float, num_logits: float) -> float:
    """A step of num_tokens new tokens apart from their attention over the context: every
    layer's GEMMs, activations and all-reduces, num_logits rows of the LM head (one per
    prompt in prefill, one per sequence in decode), the pipeline's micro-batches and the
    sends between its stages, and the fixed costs."""
    gpu, dtype = hw.gpu, model.dtype
    microbatches = max(min(pp, num_logits), 1)
    tokens = num_tokens / microbatches  # of one micro-batch
    layer = (
        sum(gemm_ms(gpu, dtype, tokens, n, k) for n, k in _weight_shapes(model, tp))
        + tokens * _activation_bytes(model, tp) / _bytes_per_ms(gpu)
        + 2 * allreduce_ms(hw, tp, tokens * model.hidden_size * model.dtype_bytes)
        + LAYER_OVERHEAD_MS
    )
    # Between stages one GPU sends the hidden state; a send costs about a small all-reduce.
    send = ALLREDUCE_LATENCY_MS[gpu.nvlink] + tokens * model.hidden_size * model.dtype_bytes / (hw.link_gb_s * 1e6)
    first = model.num_layers * layer + (pp - 1) * send
    slowest_stage = math.ceil(model.num_layers / pp) * layer + (send if pp > 1 else 0.0)
    logits = gemm_ms(gpu, dtype, num_logits, model.vocab_size / tp, model.hidden_size)
    return first + (microbatches - 1) * slowest_stage + logits + STEP_OVERHEAD_MS * pp


def _bytes_per_ms(gpu: GPUSpec) -> float:
    return gpu.mem_bw_gb_s * 1e9 * MEMORY_EFFICIENCY / 1e3


def _weight_shapes(model: ModelSpec, tp: int) -> tuple[tuple[float, float], ...]:
    """(n, k) of each weight matrix one GPU holds per layer: QKV, output, MLP up (with the
    gate when gated) and down."""
    h = model.hidden_size
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    up = (2 if model.mlp == "gated" else 1) * model.intermediate_size
    return ((q + 2 * kv) / tp, h), (h, q / tp), (up / tp, h), (h, model.intermediate_size / tp)


def _activation_bytes(model: ModelSpec, tp: int) -> float:
    """Bytes a token's activations move per layer outside the GEMMs: two norms and residual
    adds over the whole hidden state (10 reads and writes of it); on this GPU's heads, rotary
    (q, k in and out) and attention (q, k, v in, output out); the MLP activation (gate and up
    in, product out, or up in and out)."""
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    mlp = (3 if model.mlp == "gated" else 2) * model.intermediate_size
    return model.dtype_bytes * (10 * model.hidden_size + (4 * (q + kv) + mlp) / tp)


def _fit_line(xs: Sequence[float], ys: Sequence[float], through_first: bool = False) -> tuple[float, float]:
    """Intercept and slope (both >= 0) of the line closest to the points in relative error;
    through_first: of the lines through the first point."""
    w = [1 / y**2 for y in ys]
    if through_first:
        x0, y0 = xs[0], ys[0]
        slope = sum(wi * (x - x0) * (y - y0) for wi, x, y in zip(w, xs, ys, strict=True)) / sum(
            wi * (x - x0) ** 2 for wi, x in zip(w, xs, strict=True)
        )
        slope = max(slope, 0.0)
        return max(y0 - slope * x0, 0.0), slope
    s0, s1 = sum(w), sum(wi * x for wi, x in zip(w, xs, strict=True))
    s2 = sum(wi * x * x for wi, x in zip(w, xs, strict=True))
    r0, r1 = (
        sum(wi * y for wi, y in zip(w, ys, strict=True)),
        sum(wi * x * y for wi, x, y in zip(w, xs, ys, strict=True)),
    )
    slope = (s0 * r1 - s1 * r0) / (s0 * s2 - s1 * s1)
    intercept = (r0 - slope * s1) / s0
    if intercept < 0:
        return 0.0, r1 / s2
    return intercept, max(slope, 0.0)


@dataclass(frozen=True)
class ProfileEntry:
    gpu_type: str
    tp: int
    pp: int
    coefficients: Coefficients


@dataclass(frozen=True)
class Profile:
    """Measured or user-fitted coefficients for one model on some (GPU type, tp, pp)."""

    model: str  # the model name the coefficients belong to
    entries: tuple[ProfileEntry, ...]

    def find(self, gpu_type: str, tp: int, pp: int) -> Coefficients | None:
        for e in self.entries:
            if (e.gpu_type, e.tp, e.pp) == (gpu_type, tp, pp):
                return e.coefficients
        return None

    @staticmethod
    def from_dict(data: dict) -> Profile:
        check_keys("profile", data, ("model", "entries"))
        entries = []
        for i, e in enumerate(as_list("profile.entries", data["entries"])):
            where = f"profile.entries[{i}]"
            check_keys(where, e, ("gpu_type", "prefill_ms", "decode_ms"), ("tp", "pp"))
            pre = check_keys(f"{where}.prefill_ms", e["prefill_ms"], ("a", "b", "c"))
            dec = check_keys(f"{where}.decode_ms", e["decode_ms"], ("A", "B", "C"))
            coeffs = {
                k: as_number(f"{where}.{'prefill_ms' if k in pre else 'decode_ms'}.{k}", v, minimum=0)
                for k, v in {**pre, **dec}.items()
            }
            entries.append(
                ProfileEntry(
                    as_str(f"{where}.gpu_type", e["gpu_type"]),
                    as_int(f"{where}.tp", e.get("tp", 1), minimum=1),
                    as_int(f"{where}.pp", e.get("pp", 1), minimum=1),
                    Coefficients(**coeffs, source="profile"),
                )
            )
        return Profile(as_str("profile.model", data["model"]), tuple(entries))

    def to_dict(self) -> dict:
        entries = []
        for e in self.entries:
            c = asdict(e.coefficients)
            entries.append(
                {
                    "gpu_type": e.gpu_type,
                    "tp": e.tp,
                    "pp": e.pp,
                    "prefill_ms": {k: c[k] for k in "abc"},
                    "decode_ms": {k: c[k] for k in "ABC"},
                }
            )
        return {"model": self.model, "entries": entries}

    @staticmethod
    def load(path) -> Profile:
        return Profile.from_dict(load_document(path, "profile"))

    def save(self, path) -> None:
        dump_document(self.to_dict(), path)


class LatencyTable:
    """Coefficients for every (node hardware, tp, pp): the profile's where it has them."""

    def __init__(self, model: ModelSpec, profile: Profile | None = None, gpu_types: Iterable[str] | None = None):
        """gpu_types: the cluster's; a profile entry for none of them is refused (a mistyped
        name would otherwise leave that GPU type on the roofline without a word)."""
        if profile is not None and profile.model != model.name:
            raise ValueError(
                f"profile.model is {profile.model!r} but the plan is for model "
                f"{model.name!r}: profile coefficients hold for one model only"
            )
        if profile is not None and gpu_types is not None:
            known = tuple(dict.fromkeys(gpu_types))
            for i, e in enumerate(profile.entries):
                if e.gpu_type not in known:
                    raise ValueError(
                        f"profile.entries[{i}].gpu_type {e.gpu_type!r} matches no node of the "
                        f"cluster; its GPU types: {', '.join(known)} (tandem profile --gpu-type "
                        f"files measurements under one)"
                    )
        self.model = model
        self.profile = profile

    def coefficients(self, hw: NodeHardware, tp: int, pp: int) -> Coefficients:
        measured = self.profile.find(hw.gpu.name, tp, pp) if self.profile else None
        return measured or roofline(self.model, hw, tp, pp)

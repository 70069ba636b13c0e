"""Latency model per (GPU type, TP, PP): step time of one engine step from what it computes.

Both sources give coefficients in the form DistServe fits (milliseconds):

    prefill(T)        = a + b*T + c*T^2        T: tokens of one prompt
    decode(batch, K)  = A + B*K + C*batch      K: context tokens of the batch, summed

For a batch of prompts (or chunks of them) the quadratic (attention) term is summed per
sequence: c * sum(new * (cached + new)), which is c*T^2 for one whole prompt. A step that
mixes decodes and prefill chunks pays the larger fixed cost once and both marginal terms.
The whole instance is described, all pp stages; pipelining lets pp steps overlap.

Sources, in order: a profile file (measured by `tandem profile`, or fitted coefficients a
user supplies) with an entry for the exact (GPU type, tp, pp); else the roofline below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from planner.gpus import NodeHardware
from proto.model_spec import ModelSpec
from proto.schema import as_int, as_list, as_number, as_str, check_keys, dump_document, load_document

# Fractions of datasheet peaks that real kernels reach: large prefill GEMMs run near 60%
# of peak tensor throughput; decode's weight and KV reads near 80% of peak bandwidth.
COMPUTE_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.8
STEP_OVERHEAD_MS = 1.0  # scheduling, input preparation and kernel launches per step
COLLECTIVE_LATENCY_MS = {True: 0.01, False: 0.03}  # per all-reduce: NVLink, PCIe


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
        return (fixed + self.b * prefill_tokens + self.c * attn_tokens2
                + self.B * context_tokens + self.C * num_decodes)


def roofline(model: ModelSpec, hw: NodeHardware, tp: int, pp: int) -> Coefficients:
    """Analytical coefficients from the GPU's peaks; the sum of compute and memory time
    (not their max) keeps the DistServe form and errs on the slow side near the ridge."""
    gpu, dt = hw.gpu, model.dtype_bytes
    flops = gpu.peak_flops(model.dtype) * COMPUTE_EFFICIENCY * tp / 1e3  # per ms, whole instance
    mem = gpu.mem_bw_gb_s * 1e9 * MEMORY_EFFICIENCY * tp / 1e3  # bytes per ms, one stage's GPUs
    link = hw.link_gb_s * 1e9 / 1e3
    linear_flops = 2 * (model.num_params - model.vocab_size * model.hidden_size)  # per token
    weight_ms = model.weight_bytes / mem  # every stage reads its share: pp stages in sequence
    # Tensor parallelism: two ring all-reduces of the hidden state per layer.
    ring = 2 * (tp - 1) / tp * model.hidden_size * dt / link if tp > 1 else 0.0
    tp_ms_per_token = 2 * model.num_layers * ring
    tp_fixed_ms = 2 * model.num_layers * COLLECTIVE_LATENCY_MS[gpu.nvlink] if tp > 1 else 0.0
    # Pipeline parallelism: pp - 1 sends of the hidden state between stages.
    pp_ms_per_token = (pp - 1) * model.hidden_size * dt / link
    pp_fixed_ms = (pp - 1) * COLLECTIVE_LATENCY_MS[gpu.nvlink]
    fixed = STEP_OVERHEAD_MS * pp + weight_ms + tp_fixed_ms + pp_fixed_ms
    per_token = linear_flops / flops + tp_ms_per_token + pp_ms_per_token
    attention_flops = 2 * model.num_layers * model.num_heads * model.head_dim  # causal: per T^2
    kv_read_ms = model.kv_bytes_per_token / mem  # per context token of a decode
    return Coefficients(a=fixed, b=per_token, c=attention_flops / flops,
                        A=fixed, B=kv_read_ms + 2 * attention_flops / flops, C=per_token)


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
    def from_dict(data: dict) -> "Profile":
        check_keys("profile", data, ("model", "entries"))
        entries = []
        for i, e in enumerate(as_list("profile.entries", data["entries"])):
            where = f"profile.entries[{i}]"
            check_keys(where, e, ("gpu_type", "prefill_ms", "decode_ms"), ("tp", "pp"))
            pre = check_keys(f"{where}.prefill_ms", e["prefill_ms"], ("a", "b", "c"))
            dec = check_keys(f"{where}.decode_ms", e["decode_ms"], ("A", "B", "C"))
            coeffs = {k: as_number(f"{where}.{'prefill_ms' if k in pre else 'decode_ms'}.{k}", v, minimum=0)
                      for k, v in {**pre, **dec}.items()}
            entries.append(ProfileEntry(as_str(f"{where}.gpu_type", e["gpu_type"]),
                                        as_int(f"{where}.tp", e.get("tp", 1), minimum=1),
                                        as_int(f"{where}.pp", e.get("pp", 1), minimum=1),
                                        Coefficients(**coeffs, source="profile")))
        return Profile(as_str("profile.model", data["model"]), tuple(entries))

    def to_dict(self) -> dict:
        entries = []
        for e in self.entries:
            c = asdict(e.coefficients)
            entries.append({"gpu_type": e.gpu_type, "tp": e.tp, "pp": e.pp,
                            "prefill_ms": {k: c[k] for k in "abc"},
                            "decode_ms": {k: c[k] for k in "ABC"}})
        return {"model": self.model, "entries": entries}

    @staticmethod
    def load(path) -> "Profile":
        return Profile.from_dict(load_document(path, "profile"))

    def save(self, path) -> None:
        dump_document(self.to_dict(), path)


class LatencyTable:
    """Coefficients for every (node hardware, tp, pp): the profile's where it has them."""

    def __init__(self, model: ModelSpec, profile: Profile | None = None, gpu_types: Iterable[str] | None = None):
        """gpu_types: the cluster's; a profile entry for none of them is refused (a mistyped
        name would otherwise leave that GPU type on the roofline without a word)."""
        if profile is not None and profile.model != model.name:
            raise ValueError(f"profile.model is {profile.model!r} but the plan is for model "
                             f"{model.name!r}: profile coefficients hold for one model only")
        if profile is not None and gpu_types is not None:
            known = tuple(dict.fromkeys(gpu_types))
            for i, e in enumerate(profile.entries):
                if e.gpu_type not in known:
                    raise ValueError(f"profile.entries[{i}].gpu_type {e.gpu_type!r} matches no node of the "
                                     f"cluster; its GPU types: {', '.join(known)} (tandem profile --gpu-type "
                                     f"files measurements under one)")
        self.model = model
        self.profile = profile

    def coefficients(self, hw: NodeHardware, tp: int, pp: int) -> Coefficients:
        measured = self.profile.find(hw.gpu.name, tp, pp) if self.profile else None
        return measured or roofline(self.model, hw, tp, pp)

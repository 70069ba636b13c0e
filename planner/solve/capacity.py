"""What one instance can serve within the SLO: the options the MILP chooses from.

An option is a (node hardware, role, tp, pp) with its latency coefficients, KV capacity
and SLO-feasible throughput:

- prefill: the highest Poisson rate at which the SLO's TTFT percentile holds (M/G/1 over
  the workload's prompt lengths, planner/solve/queueing.py);
- decode: the highest rate at which the batch that the rate builds up stays within the
  TPOT target and the KV memory. The batch is random (a negative binomial, see
  queueing.decode_batch_pmf) and is taken at the SLO's TPOT percentile, because a
  request's TPOT is set by the batches it shares. KV also holds the prompts reserved for
  requests still in prefill (decode reserves before prefill pushes), about rate x TTFT
  of them, and is sized for a far higher quantile than TPOT: running out of it preempts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from planner.latency.gpus import NodeHardware
from planner.latency.roofline import Coefficients, LatencyTable
from planner.solve import queueing
from proto.model_spec import ModelSpec
from proto.slo import SLOSpec

GPU_MEMORY_UTILIZATION = 0.9  # the rest: activations, CUDA context, fragmentation
MIN_PREFILL_BUDGET = 512  # scheduler token budget floor (the engine's default chunk)
PARALLEL_SIZES = (1, 2, 4, 8)
MAX_DECODE_BATCH = 1024
# Running out of KV blocks preempts and recomputes sequences, which adds load exactly when
# there is none to spare; KV is sized for the 99.9th percentile of its occupancy.
KV_SAFETY_Z = 3.1
# A decode instance is sized, for Poisson arrivals, to complete at most this share of what
# it would with every slot busy: the free slots absorb the arrivals' variance (a full batch
# queues new requests for a slot, in their TTFT).
DECODE_UTILIZATION = 0.95
# Prompts per prefill step are bounded by the token budget; this only caps the case of
# many short prompts, whose batching barely saves time over running them in turn.
MAX_PREFILL_SEQS = 16


@dataclass(frozen=True)
class WorkloadStats:
    """Samples of the workload's lengths, and the averages the capacity model uses."""

    input_tokens: np.ndarray
    output_tokens: np.ndarray
    max_tokens: int  # the longest request (prompt plus output) the workload holds
    arrival_cv2: float = 1.0  # burstiness of the arrivals (WorkloadSpec.arrival_cv2): 1 is Poisson

    @property
    def mean_decode_steps(self) -> float:
        """Decode steps per request: every output token but the first, which prefill samples
        (floored above zero: a workload of one-token outputs still has a finite decode rate)."""
        return max(float(np.maximum(self.output_tokens - 1, 0).mean()), 1e-3)

    @property
    def decode_context(self) -> float:
        """Mean KV tokens of a decoding sequence, weighted by how long each one decodes."""
        return self.decode_kv_moments[0]

    @property
    def decode_kv_moments(self) -> tuple[float, float]:
        """E[X], E[X^2] of the KV tokens X of a sequence seen in a decode batch at a random
        step: its prompt plus a uniform share of its output, weighted by decode steps."""
        steps = np.maximum(self.output_tokens - 1, 0).astype(float)
        prompt = self.input_tokens.astype(float)
        if not steps.sum():
            return float(prompt.mean()), float((prompt**2).mean())
        w = steps / steps.sum()
        first = (w * (prompt + steps / 2)).sum()
        second = (w * (prompt**2 + prompt * steps + steps**2 / 3)).sum()
        return float(first), float(second)


@dataclass(frozen=True)
class InstanceOption:
    role: str  # prefill | decode
    hardware: NodeHardware
    tp: int
    pp: int
    coefficients: Coefficients
    kv_tokens: int  # KV capacity of the instance in tokens
    capacity_rps: float  # SLO-feasible throughput
    max_batch_size: int  # scheduler max_num_seqs (per pipeline stage's batch)
    max_batched_tokens: int  # scheduler token budget
    # Prefill: the number of prefill instances whose pooled queue capacity_rps assumes (the
    # router sends each prompt to the least loaded one); a placement with fewer is refused.
    pool_size: int = 1
    # Simulated over modelled capacity of the role (planner/simulate/calibration.py), already in
    # capacity_rps; the forecast's queue formulas see an instance's rate divided by it.
    calibration: float = 1.0

    @property
    def gpu_type(self) -> str:
        return self.hardware.gpu.name

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    @property
    def cost_per_hour(self) -> float:
        return self.num_gpus * self.hardware.cost_per_gpu_hour

    def label(self) -> str:
        return f"{self.role} {self.gpu_type} tp={self.tp} pp={self.pp}"


def valid_parallelism(model: ModelSpec, tp: int, pp: int) -> bool:
    """tp must split the query heads and split (or replicate) the KV heads evenly."""
    kv_ok = model.num_kv_heads % tp == 0 or tp % model.num_kv_heads == 0
    return model.num_heads % tp == 0 and kv_ok and pp <= model.num_layers


def kv_capacity_tokens(model: ModelSpec, hw: NodeHardware, tp: int, pp: int) -> int:
    """Tokens of KV one instance holds; 0 when its share of the weights does not fit."""
    free = hw.memory_bytes * GPU_MEMORY_UTILIZATION - model.weight_bytes / (tp * pp)
    layers_per_stage = math.ceil(model.num_layers / pp)
    heads_per_gpu = math.ceil(model.num_kv_heads / tp)  # replicated when tp > KV heads
    per_token = 2 * layers_per_stage * heads_per_gpu * model.head_dim * model.dtype_bytes
    return max(int(free // per_token), 0)


def has_latency(latency: LatencyTable, hw: NodeHardware, tp: int, pp: int) -> bool:
    """Whether step times are known for (hw, tp, pp): the roofline's GPUs always; a device
    without a datasheet (cpu) only where the profile has the exact (tp, pp)."""
    return hw.gpu.has_roofline or (
        latency.profile is not None and latency.profile.find(hw.gpu.name, tp, pp) is not None
    )


def fits(model: ModelSpec, hw: NodeHardware, tp: int, pp: int, max_tokens: int) -> bool:
    """Whether the instance holds its weights and the longest request in one engine's KV."""
    return valid_parallelism(model, tp, pp) and kv_capacity_tokens(model, hw, tp, pp) >= max_tokens


def prefill_service_s(coeffs: Coefficients, stats: WorkloadStats) -> np.ndarray:
    tokens: Any = stats.input_tokens.astype(float)  # prefill_ms is elementwise: an array in, an array out
    return np.asarray(coeffs.prefill_ms(tokens)) / 1e3


def prefill_capacity(coeffs: Coefficients, stats: WorkloadStats, slo: SLOSpec, pool_size: int = 1) -> float:
    """Requests/s one prefill instance serves within the TTFT percentile, as one of pool_size
    instances whose queues the router pools (queueing.ttft_exceed_prob)."""
    return queueing.max_rate(
        prefill_service_s(coeffs, stats), slo.ttft_s, slo.ttft_percentile / 100, stats.arrival_cv2, pool_size
    )


def pooled(options: list[InstanceOption], stats: WorkloadStats, slo: SLOSpec, pool_size: int) -> list[InstanceOption]:
    """The options with prefill capacities of a member of a pool of pool_size prefill
    instances: the router sends each prompt to the least loaded one, so together they wait
    like one queue of pool_size servers, far less than each alone. Decode options unchanged."""
    if pool_size == 1:
        return options
    return [
        replace(
            o,
            capacity_rps=prefill_capacity(o.coefficients, stats, slo, pool_size) * o.calibration,
            pool_size=pool_size,
        )
        if o.role == "prefill"
        else o
        for o in options
    ]


@dataclass(frozen=True)
class DecodeLimits:
    capacity_rps: float
    max_batch_size: int  # the scheduler's batch cap (max_num_seqs)


def decode_load(coeffs: Coefficients, stats: WorkloadStats, engine_rate_rps: float) -> tuple[float, float]:
    """(rho, a) of one decode engine's batch distribution (queueing.decode_batch_pmf)."""
    per_seq_ms = coeffs.B * stats.decode_context + coeffs.C
    rho = engine_rate_rps * stats.mean_decode_steps * per_seq_ms / 1e3
    return rho, coeffs.A / per_seq_ms


def decode_tpot_exceed(
    coeffs: Coefficients, stats: WorkloadStats, engine_rate_rps: float, t_s: float, max_batch: int = MAX_DECODE_BATCH
) -> float:
    """P(a decode step of one engine's batch takes longer than t_s) at this arrival rate; the
    batch is the demand the rate builds up, capped at the engine's max_batch (the rest wait)."""
    rho, a = decode_load(coeffs, stats, engine_rate_rps)
    per_seq_ms = coeffs.B * stats.decode_context + coeffs.C
    k = math.floor((t_s * 1e3 - coeffs.A) / per_seq_ms)  # the largest batch within t_s
    if k >= max_batch:
        return 0.0
    if rho >= 1:
        return 1.0
    return 1.0 if k < 0 else float(queueing.decode_batch_pmf(rho, a, stats.arrival_cv2)[k + 1 :].sum())


def decode_limits(
    coeffs: Coefficients, kv_tokens: int, stats: WorkloadStats, slo: SLOSpec, block_size: int
) -> DecodeLimits:
    ctx, ctx2 = stats.decode_kv_moments
    ctx += block_size / 2  # half a block of slack per sequence
    var_ctx = max(ctx2 - stats.decode_context**2, 0.0)
    prompt = float(stats.input_tokens.mean()) + block_size / 2
    tpot_ms = slo.tpot_s * 1e3
    per_seq_ms = coeffs.B * stats.decode_context + coeffs.C

    def slots(rate: float) -> tuple[float, float]:
        """(running, reserved) of one engine at this rate: the sequences it runs at most,
        within TPOT at their own step and within the KV left by the prompts reserved for
        requests in prefill (about rate x TTFT of them: decode reserves before prefill runs),
        each sequence of random size, at KV_SAFETY_Z (running sequences never preempt)."""
        reserved = rate * slo.ttft_s
        kv_for_batch = kv_tokens - reserved * prompt
        # n ctx + z sqrt(n var_ctx) = kv_for_batch is a quadratic in sqrt(n).
        z_sigma = KV_SAFETY_Z * math.sqrt(var_ctx)
        root = (math.sqrt(z_sigma**2 + 4 * ctx * max(kv_for_batch, 0.0)) - z_sigma) / (2 * ctx)
        return min((tpot_ms - coeffs.A) / per_seq_ms, root**2), reserved

    # Square-root staffing (Halfin-Whitt): the slots kept free for the variance of a many-server
    # queue grow with the square root of its variability, (ca2 + cs2) / (1 + cs2) relative to
    # Poisson arrivals, cs2 that of the lifetimes (decode steps); so does the free share here.
    free_share = (1 - DECODE_UTILIZATION) * math.sqrt(
        queueing.burst_factor(stats.arrival_cv2, stats.output_tokens.astype(float))
    )
    utilization = max(1 - free_share, 0.0)

    def feasible(rate: float) -> bool:
        """Within `utilization` of what the engine completes with every slot busy, and within
        the TPOT percentile by the batch law the forecast uses (predict.py), so that the
        forecast at a capacity meets the TPOT percentile that the capacity promises."""
        running, _ = slots(rate)
        if running < 1:
            return False
        full_step_s = coeffs.decode_ms(running, running * stats.decode_context) / 1e3
        if rate > utilization * running / (stats.mean_decode_steps * full_step_s):
            return False
        return decode_tpot_exceed(coeffs, stats, rate, slo.tpot_s) <= 1 - slo.tpot_percentile / 100

    lo, hi = 0.0, 1e3 / (stats.mean_decode_steps * per_seq_ms)  # rho = 1: no batch is that fast
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    if lo <= 0:
        return DecodeLimits(0.0, 1)
    # The scheduler's batch cap counts running and reserved sequences.
    running, reserved = slots(lo)
    cap = int(running + reserved + KV_SAFETY_Z * math.sqrt(reserved * stats.arrival_cv2))
    return DecodeLimits(lo, min(max(cap, 1), MAX_DECODE_BATCH))


def enumerate_options(
    model: ModelSpec,
    hardware: dict[NodeHardware, int],
    latency: LatencyTable,
    stats: WorkloadStats,
    slo: SLOSpec,
    block_size: int,
    max_pp: int = max(PARALLEL_SIZES),
) -> list[InstanceOption]:
    """Every (role, tp, pp <= max_pp) that fits each hardware, up to its largest node's GPU count,
    and whose step times are known (has_latency: cpu devices take the profile's (tp, pp) only).

    A node hosts an option when tp x pp is at most its GPU count (planner/solve/milp.py:
    power-of-two instances pack whenever their GPUs add up). Options with zero capacity are
    dropped.
    """
    options = []
    prefill_budget = max(int(stats.input_tokens.max()), MIN_PREFILL_BUDGET)
    for hw, max_gpus in hardware.items():
        for tp in PARALLEL_SIZES:
            for pp in PARALLEL_SIZES:
                if (
                    pp > max_pp
                    or tp * pp > max_gpus
                    or not fits(model, hw, tp, pp, stats.max_tokens)
                    or not has_latency(latency, hw, tp, pp)
                ):
                    continue
                kv_tokens = kv_capacity_tokens(model, hw, tp, pp)
                coeffs = latency.coefficients(hw, tp, pp)
                cap = prefill_capacity(coeffs, stats, slo)
                if cap > 0:
                    options.append(
                        InstanceOption(
                            "prefill",
                            hw,
                            tp,
                            pp,
                            coeffs,
                            kv_tokens,
                            cap,
                            max_batch_size=MAX_PREFILL_SEQS,
                            max_batched_tokens=prefill_budget,
                        )
                    )
                limits = decode_limits(coeffs, kv_tokens, stats, slo, block_size)
                if limits.capacity_rps > 0:
                    options.append(
                        InstanceOption(
                            "decode",
                            hw,
                            tp,
                            pp,
                            coeffs,
                            kv_tokens,
                            limits.capacity_rps,
                            limits.max_batch_size,
                            max(MIN_PREFILL_BUDGET, limits.max_batch_size),
                        )
                    )
    return options


def prune_dominated(options: list[InstanceOption]) -> list[InstanceOption]:
    """Drop an option when k copies of a smaller one on the same hardware serve as much.

    Replacing it by those copies keeps every node's GPU count, and the KV traffic depends
    only on the rate, so the MILP's optimum is unchanged while it has fewer variables.
    """
    kept = []
    for o in options:
        dominated = any(
            p is not o
            and p.role == o.role
            and p.hardware == o.hardware
            and o.num_gpus % p.num_gpus == 0
            and (
                (o.num_gpus // p.num_gpus) * p.capacity_rps > o.capacity_rps
                or (
                    (o.num_gpus // p.num_gpus) * p.capacity_rps == o.capacity_rps
                    and (p.num_gpus, p.tp) < (o.num_gpus, o.tp)
                )
            )
            for p in options
        )
        if not dominated:
            kept.append(o)
    return kept

"""Layer-split mode, for models that fit no single node: Helix's max-flow MILP, per phase.

Each node runs one stage: a contiguous range of the model's layers for prefill or for
decode, tensor-parallel over its GPUs. Layers are grouped into at most MAX_UNITS units so
the ranges stay few. Requests flow through stages whose ranges chain from layer 0 to the
last layer; the most that flows through the prefill stages and through the decode stages
(the smaller of the two) is the goodput::

    z[c,r,s,e]  integer  nodes of class c (identical nodes) running units [s, e) for
                         role r
    n[c,r]      integer  nodes of class c running role r: the sum of z[c,r,s,e] over
                         (s, e); a node runs one stage, so n[c,prefill] + n[c,decode] <= |c|
    f[c,r,s,e]  >= 0     requests/s through those stages,  f <= cap(c, r, e - s) z
    sum of f ending at boundary j == sum of f starting at j      (each role and tp, 0 < j < U)
    goodput <= sum of f starting at 0                             (each role)
    cap(c, r, s, e) is also capped by one node's NIC: the activations in and out between
    stages, plus the KV a prefill stage sends to the decode stages holding the same
    layers, of the f / z requests/s each of the z nodes carries, fit that node's NIC
    (per node, not summed over a class: a spare NIC cannot carry another node's bytes;
    listed cluster links are not modelled in this mode)

n adds no constraint the z do not have, but it is what the search branches on best: how
many nodes of a class prefill and how many decode splits the space where it matters, while
branching on single ranges wanders among the many near-equal ways to chain the same stages
(on a 42-node cluster of five GPU types: within 1% in under a second instead of 1.05% after
300 s, see docs/planner.md).

Flow is conserved per tp as well as per role: tandem serve runs a chain of stages as one
pipeline worker, whose stages share one tp, so a request never moves between stages of
different tp. Chains are then read off the flows (proto/plan.py layer_chains).

A stage of k of the model's L layers gets k / L of the TTFT and TPOT targets, so a chain
of stages meets the whole target; its capacity is the single-instance model
(planner/solve/capacity.py) with the latency coefficients scaled by k / L.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

from planner.latency.gpus import NodeHardware
from planner.latency.roofline import Coefficients, LatencyTable
from planner.solve import queueing
from planner.solve.capacity import (
    WorkloadStats,
    decode_limits,
    decode_load,
    decode_tpot_exceed,
    kv_capacity_tokens,
    prefill_capacity,
    prefill_service_s,
    valid_parallelism,
)
from planner.solve.network import BANDWIDTH_UTILIZATION
from planner.solve.solver import SolveOptions, solve
from proto.cluster import ClusterSpec
from proto.model_spec import ModelSpec
from proto.plan import LayerStage, Metrics, SolverInfo
from proto.slo import SLOSpec

MAX_UNITS = 12
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class LayerSplit:
    stages: tuple[LayerStage, ...]
    goodput_rps: float
    solver: SolverInfo


def unit_bounds(num_layers: int) -> list[int]:
    units = min(num_layers, MAX_UNITS)
    return [round(j * num_layers / units) for j in range(units + 1)]


def stage_tp(model: ModelSpec, num_gpus: int) -> int:
    """The largest power-of-two tensor parallelism the node's GPUs and the heads allow."""
    tp = 1
    while tp * 2 <= num_gpus and valid_parallelism(model, tp * 2, 1):
        tp *= 2
    return tp


def _scaled(c: Coefficients, f: float) -> Coefficients:
    return Coefficients(c.a * f, c.b * f, c.c * f, c.A * f, c.B * f, c.C * f, c.source)


def stage_model(
    model: ModelSpec, hw: NodeHardware, tp: int, layers: int, latency: LatencyTable, slo: SLOSpec
) -> tuple[Coefficients, SLOSpec, ModelSpec]:
    """A stage's coefficients and SLO share; the part of the model it holds (whose
    embeddings are counted whole: small beside a model that needs splitting)."""
    share = layers / model.num_layers
    coeffs = _scaled(latency.coefficients(hw, tp, 1), share)
    return coeffs, replace(slo, ttft_s=slo.ttft_s * share, tpot_s=slo.tpot_s * share), replace(model, num_layers=layers)


def stage_capacity(
    model: ModelSpec,
    hw: NodeHardware,
    tp: int,
    layers: int,
    role: str,
    latency: LatencyTable,
    stats: WorkloadStats,
    slo: SLOSpec,
    block_size: int,
) -> float:
    """Requests/s a node serves holding `layers` layers for role, within its share of the SLO."""
    coeffs, stage_slo, part = stage_model(model, hw, tp, layers, latency, slo)
    if kv_capacity_tokens(part, hw, tp, 1) < stats.max_tokens:
        return 0.0
    if role == "prefill":
        return prefill_capacity(coeffs, stats, stage_slo)
    return decode_limits(coeffs, kv_capacity_tokens(part, hw, tp, 1), stats, stage_slo, block_size).capacity_rps


def stage_bytes_per_request(
    model: ModelSpec, stats: WorkloadStats, role: str, layer_start: int, layer_end: int
) -> tuple[float, float]:
    """Bytes one request makes a node of the stage send and receive: the hidden states
    to and from the neighbouring stages (every prompt token in prefill, one per output
    token in decode), and the KV of the stage's layers from prefill to decode."""
    tokens = float(stats.input_tokens.mean() if role == "prefill" else stats.output_tokens.mean())
    activations = model.hidden_size * model.dtype_bytes * tokens
    kv = model.kv_bytes_per_token / model.num_layers * (layer_end - layer_start) * float(stats.input_tokens.mean())
    sent = activations * (layer_end < model.num_layers) + (kv if role == "prefill" else 0.0)
    received = activations * (layer_start > 0) + (kv if role == "decode" else 0.0)
    return sent, received


def nic_capacity(
    model: ModelSpec, stats: WorkloadStats, role: str, layer_start: int, layer_end: int, nic_gb_s: float
) -> float:
    """Requests/s one node's NIC carries for the stage, in its busier direction."""
    busiest = max(stage_bytes_per_request(model, stats, role, layer_start, layer_end))
    return nic_gb_s * 1e9 * BANDWIDTH_UTILIZATION / busiest if busiest > 0 else math.inf


def solve_layer_split(
    cluster: ClusterSpec,
    hardware: dict[str, NodeHardware],
    model: ModelSpec,
    latency: LatencyTable,
    stats: WorkloadStats,
    slo: SLOSpec,
    block_size: int,
    solve_options: SolveOptions,
    progress: Callable[[str], None] | None = None,
    carried: dict[str, float] | None = None,
) -> LayerSplit:
    """carried: requests/s per role that other stages carry already; the goodput counts them
    (what stages on the nodes left over add to chains already served)."""
    import pulp

    bounds = unit_bounds(model.num_layers)
    units = len(bounds) - 1
    # Identical nodes are one class with integer counts: no symmetric twins to search.
    classes: dict[tuple, list[str]] = defaultdict(list)
    for spec in cluster.nodes:
        classes[(hardware[spec.name], spec.num_gpus, spec.nic_gb_s)].append(spec.name)
    prob = pulp.LpProblem("layer_split", pulp.LpMaximize)
    z, f, caps = {}, {}, {}
    cache: dict[tuple, float] = {}  # (hardware, tp, role, layers) -> capacity
    for k, ((hw, num_gpus, nic_gb_s), names) in enumerate(classes.items()):
        tp = stage_tp(model, num_gpus)
        for r in ROLES:
            for s in range(units):
                for e in range(s + 1, units + 1):
                    stage = (hw, tp, r, bounds[e] - bounds[s])
                    if stage not in cache:
                        cache[stage] = stage_capacity(model, hw, tp, stage[3], r, latency, stats, slo, block_size)
                    cap = min(cache[stage], nic_capacity(model, stats, r, bounds[s], bounds[e], nic_gb_s))
                    if cap <= 0:
                        continue
                    caps[k, r, s, e] = (cap, tp)
                    z[k, r, s, e] = prob.add_variable(f"z_{k}_{r[0]}_{s}_{e}", 0, len(names), cat="Integer")
                    f[k, r, s, e] = prob.add_variable(f"f_{k}_{r[0]}_{s}_{e}", 0)
    goodput = prob.add_variable("goodput", 0)
    prob += goodput
    for key, var in f.items():
        prob += var <= caps[key][0] * z[key]
    for k, names in enumerate(classes.values()):
        n = {r: prob.add_variable(f"n_{k}_{r[0]}", 0, len(names), cat="Integer") for r in ROLES}
        for r in ROLES:
            prob += n[r] == pulp.lpSum(v for key, v in z.items() if key[0] == k and key[1] == r)
        prob += n["prefill"] + n["decode"] <= len(names)
    # Flow is conserved per tp, not only per role: a pipeline worker's stages share one tp
    # (engine/parallel.py), so a request's chain of stages keeps the tp it starts with.
    for r in ROLES:
        for tp in {caps[key][1] for key in f if key[1] == r}:
            flows = {key: v for key, v in f.items() if key[1] == r and caps[key][1] == tp}
            for j in range(1, units):
                prob += pulp.lpSum(v for (_, _, s, e), v in flows.items() if e == j) == pulp.lpSum(
                    v for (_, _, s, e), v in flows.items() if s == j
                )
        prob += goodput <= pulp.lpSum(v for (_, rr, s, e), v in f.items() if rr == r and s == 0) + (carried or {}).get(
            r, 0.0
        )
    info = solve(prob, solve_options, progress)
    if info.status not in ("optimal", "time_limit"):
        return LayerSplit((), 0.0, info)
    stages = []
    free = [list(names) for names in classes.values()]
    for (k, r, s, e), var in f.items():
        count, rate = round(z[k, r, s, e].value() or 0), var.value() or 0.0
        if count and rate > 1e-9:
            tp = caps[k, r, s, e][1]
            for node in (free[k].pop(0) for _ in range(count)):
                source = latency.coefficients(hardware[node], tp, 1).source
                stages.append(
                    LayerStage(
                        role=r,
                        node=node,
                        gpu_type=hardware[node].gpu.name,
                        tp=tp,
                        layer_start=bounds[s],
                        layer_end=bounds[e],
                        rate_rps=round(rate / count, 4),
                        latency_source=source,
                    )
                )
    stages.sort(key=lambda st: (ROLES.index(st.role), st.layer_start, st.node))
    return LayerSplit(tuple(stages), float(goodput.value() or 0.0), info)


def predict_split(
    split: LayerSplit,
    hardware: dict[str, NodeHardware],
    model: ModelSpec,
    latency: LatencyTable,
    stats: WorkloadStats,
    slo: SLOSpec,
) -> Metrics:
    """Figures at the split's goodput. A chain's shares of a target add up to one, so the
    largest quantile-to-share ratio of any stage bounds the percentiles."""
    ttft_bound = tpot_bound = 0.0
    for st in split.stages:
        layers = st.layer_end - st.layer_start
        share = layers / model.num_layers
        coeffs, _, _ = stage_model(model, hardware[st.node], st.tp, layers, latency, slo)
        if st.role == "prefill":
            ttft_s = queueing.ttft_quantile(st.rate_rps, prefill_service_s(coeffs, stats), slo.ttft_percentile / 100)
            ttft_bound = max(ttft_bound, ttft_s / share)
            continue
        rho, a = decode_load(coeffs, stats, st.rate_rps)
        if rho >= 1:  # overloaded: no percentile of TPOT is bounded
            tpot_bound = math.inf
        else:
            batch = queueing.batch_quantile(queueing.decode_batch_pmf(rho, a), slo.tpot_percentile / 100)
            tpot_bound = max(tpot_bound, coeffs.decode_ms(batch, batch * stats.decode_context) / 1e3 / share)
    attainment = split_attainment(split, hardware, model, latency, stats, slo, split.goodput_rps)
    return Metrics(
        rate_rps=round(split.goodput_rps, 4),
        goodput_rps=round(split.goodput_rps, 4),
        attainment=round(attainment, 4),
        ttft_s=round(ttft_bound, 4),
        tpot_s=round(tpot_bound, 4),
    )


def split_attainment(
    split: LayerSplit,
    hardware: dict[str, NodeHardware],
    model: ModelSpec,
    latency: LatencyTable,
    stats: WorkloadStats,
    slo: SLOSpec,
    rate_rps: float,
) -> float:
    """Forecast attainment at rate_rps, every stage's flow scaled to it. Each stage meets
    its share of a target with some probability; a chain meets the target when all its
    stages do, so the worst stage of each role bounds attainment."""
    scale = rate_rps / split.goodput_rps if split.goodput_rps else 0.0
    worst_miss = {r: 0.0 for r in ROLES}
    for st in split.stages:
        rate = st.rate_rps * scale
        coeffs, stage_slo, _ = stage_model(model, hardware[st.node], st.tp, st.layer_end - st.layer_start, latency, slo)
        if st.role == "prefill":
            miss = queueing.ttft_exceed_prob(rate, prefill_service_s(coeffs, stats), stage_slo.ttft_s)
        else:
            miss = decode_tpot_exceed(coeffs, stats, rate, stage_slo.tpot_s)
        worst_miss[st.role] = max(worst_miss[st.role], miss)
    return (1 - worst_miss["prefill"]) * (1 - worst_miss["decode"])

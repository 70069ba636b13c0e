"""Messages for inputs that have no plan: what does not fit, and what would.

Three ways to fail: the model fits no instance on any node (name the smallest
configurations that would hold it); instances fit but none meets the SLO even with no load
at all (name the best TTFT and TPOT the cluster attains); or prefill and decode instances
fit but cannot be paired (no node holds both, and the network closes every path between
nodes, or there is no other node).
"""

from __future__ import annotations

import numpy as np

from planner.latency.gpus import GPU_SPECS, NodeHardware
from planner.latency.roofline import LatencyTable
from planner.solve.capacity import PARALLEL_SIZES, InstanceOption, WorkloadStats, fits, has_latency, prefill_service_s
from planner.solve.network import Traffic
from proto.cluster import ClusterSpec
from proto.model_spec import ModelSpec
from proto.slo import SLOSpec

MAX_SUGGESTED_GPUS = 64


def smallest_fit(model: ModelSpec, hw: NodeHardware, max_tokens: int) -> tuple[int, int] | None:
    """The (tp, pp) with the fewest GPUs whose instance holds the weights and one request."""
    sizes = (1, 2, 4, 8, 16, 32, 64)
    candidates = [
        (tp * pp, -tp, pp)
        for tp in sizes
        for pp in sizes
        if tp * pp <= MAX_SUGGESTED_GPUS and fits(model, hw, tp, pp, max_tokens)
    ]
    if not candidates:
        return None
    _, neg_tp, pp = min(candidates)  # fewest GPUs, then the most tensor parallelism
    return -neg_tp, pp


def does_not_fit_message(
    model: ModelSpec, hardware: dict[str, NodeHardware], num_gpus: dict[str, int], max_tokens: int
) -> str:
    weights_gb = model.weight_bytes / 1e9
    lines = [
        f"model {model.name} ({weights_gb:.1f} GB of {model.dtype} weights, plus KV for "
        f"{max_tokens} tokens) fits no instance on this cluster: an instance is at most "
        f"the GPUs of one node, tp and pp from {', '.join(map(str, PARALLEL_SIZES))}."
    ]
    seen = set()
    for hw in hardware.values():
        if hw.gpu.name in seen:
            continue
        seen.add(hw.gpu.name)
        fit = smallest_fit(model, hw, max_tokens)
        have = max(num_gpus[n] for n, h in hardware.items() if h.gpu.name == hw.gpu.name)
        if fit:
            lines.append(
                f"  {hw.gpu.name}: needs tp={fit[0]} pp={fit[1]} ({fit[0] * fit[1]} GPUs in one node); "
                f"its nodes have {have}"
            )
    others = []
    for spec in GPU_SPECS.values():
        if spec.name in seen or not spec.has_roofline:  # suggest GPUs, not CPU cores
            continue
        hw = NodeHardware(spec, spec.memory_gb * 1e9, spec.link_gb_s, spec.cost_per_hour)
        fit = smallest_fit(model, hw, max_tokens)
        if fit:
            others.append((fit[0] * fit[1], f"{fit[0] * fit[1]} x {spec.name} (tp={fit[0]} pp={fit[1]})"))
    if others:
        lines.append(
            "  smallest configurations of other GPU types that would: "
            + ", ".join(text for _, text in sorted(others)[:4])
        )
    lines.append("  or plan with --layer-split, which spreads the layers over several nodes")
    return "\n".join(lines)


def slo_unreachable_message(
    model: ModelSpec,
    hardware: dict[str, NodeHardware],
    num_gpus: dict[str, int],
    latency: LatencyTable,
    stats: WorkloadStats,
    slo: SLOSpec,
    missing_roles: list[str],
    max_pp: int = max(PARALLEL_SIZES),
) -> str:
    """The best zero-load TTFT and TPOT over every configuration that fits (pp <= max_pp)."""
    best_ttft, best_tpot = (np.inf, ""), (np.inf, "")
    for name, hw in hardware.items():
        for tp in PARALLEL_SIZES:
            for pp in PARALLEL_SIZES:
                if (
                    pp > max_pp
                    or tp * pp > num_gpus[name]
                    or not fits(model, hw, tp, pp, stats.max_tokens)
                    or not has_latency(latency, hw, tp, pp)
                ):
                    continue
                c = latency.coefficients(hw, tp, pp)
                label = f"{hw.gpu.name} tp={tp} pp={pp}"
                ttft = float(np.percentile(prefill_service_s(c, stats), slo.ttft_percentile))
                tpot = c.decode_ms(1, stats.decode_context) / 1e3
                best_ttft = min(best_ttft, (ttft, label))
                best_tpot = min(best_tpot, (tpot, label))
    return (
        f"SLO unreachable: no {' or '.join(missing_roles)} instance meets {slo.describe()} even unloaded. "
        f"Best attainable on this cluster: P{slo.ttft_percentile:g} TTFT {best_ttft[0]:.3f} s "
        f"({best_ttft[1]}, no queueing) against {slo.ttft_s:g} s; TPOT {best_tpot[0]:.4f} s "
        f"({best_tpot[1]}, batch of one) against {slo.tpot_s:g} s"
    )


def unpaired_message(
    cluster: ClusterSpec, model: ModelSpec, options: list[InstanceOption], hosts: dict[str, list[int]], traffic: Traffic
) -> str:
    """Why no request can be served although prefill and decode instances fit somewhere."""

    def smallest(node: str, role: str) -> int | None:
        sizes = [options[i].num_gpus for i in hosts[node] if options[i].role == role]
        return min(sizes) if sizes else None

    need = {n.name: (smallest(n.name, "prefill"), smallest(n.name, "decode")) for n in cluster.nodes}
    reasons = []
    both = [n for n in cluster.nodes if _fits_both(need[n.name], n.num_gpus)]
    if not both:
        largest: dict[str, tuple[int, str]] = {}
        for n in cluster.nodes:
            largest[n.gpu_type] = max(largest.get(n.gpu_type, (0, "")), (n.num_gpus, n.name))
        sizes = []
        for gpu_type, (num_gpus, name) in largest.items():
            p, d = need[name]
            if p is None and d is None:
                continue
            roles = (
                f"{p} GPUs (prefill) and {d} (decode)"
                if None not in (p, d)
                else f"{p or d} GPUs ({'prefill' if p else 'decode'}; the other role meets the SLO on none)"
            )
            sizes.append(f"one {gpu_type} instance of {model.name} needs {roles}, and node {name} has {num_gpus}")
        reasons.append("no node holds a prefill and a decode instance at once (" + "; ".join(sizes) + ")")
    elif all(traffic.local_rps[n.name] <= 0 for n in both):
        reasons.append(
            f"inside nodes {', '.join(n.name for n in both)} the GPU link is too slow for a long prompt's KV"
        )
    senders = [n.name for n in cluster.nodes if need[n.name][0] is not None]
    receivers = [n.name for n in cluster.nodes if need[n.name][1] is not None]
    pairs = [(a, b) for a in senders for b in receivers if a != b]
    if not pairs:
        reasons.append("no other node holds an instance to pair with")
    else:
        reasons.append(
            "between nodes the network closes every path (check nic_gb_s and links: a long "
            "prompt's KV must move fast enough not to spoil a short request's TPOT, see docs/planner.md)"
        )
    return (
        "no placement serves any request within the SLO: a request needs a prefill and a decode instance, "
        "and " + "; ".join(reasons)
    )


def _fits_both(need: tuple[int | None, int | None], num_gpus: int) -> bool:
    """Whether a node of num_gpus holds the smallest prefill and decode instances it can host."""
    prefill, decode = need
    return prefill is not None and decode is not None and prefill + decode <= num_gpus

"""Messages for inputs that have no plan: what does not fit, and what would.

Two ways to fail: the model fits no instance on any node (name the smallest
configurations that would hold it), or instances fit but none meets the SLO even with
no load at all (name the best TTFT and TPOT the cluster attains).
"""

from __future__ import annotations

import numpy as np

from planner.capacity import PARALLEL_SIZES, WorkloadStats, fits, prefill_service_s
from planner.gpus import GPU_SPECS, NodeHardware
from planner.latency import LatencyTable
from proto.model_spec import ModelSpec
from proto.slo import SLOSpec

MAX_SUGGESTED_GPUS = 64


def smallest_fit(model: ModelSpec, hw: NodeHardware, max_tokens: int) -> tuple[int, int] | None:
    """The (tp, pp) with the fewest GPUs whose instance holds the weights and one request."""
    sizes = (1, 2, 4, 8, 16, 32, 64)
    candidates = [(tp * pp, -tp, pp) for tp in sizes for pp in sizes
                  if tp * pp <= MAX_SUGGESTED_GPUS and fits(model, hw, tp, pp, max_tokens)]
    if not candidates:
        return None
    _, neg_tp, pp = min(candidates)  # fewest GPUs, then the most tensor parallelism
    return -neg_tp, pp


def does_not_fit_message(model: ModelSpec, hardware: dict[str, NodeHardware], num_gpus: dict[str, int],
                         max_tokens: int) -> str:
    weights_gb = model.weight_bytes / 1e9
    lines = [f"model {model.name} ({weights_gb:.1f} GB of {model.dtype} weights, plus KV for "
             f"{max_tokens} tokens) fits no instance on this cluster: an instance is at most "
             f"the GPUs of one node, tp and pp from {', '.join(map(str, PARALLEL_SIZES))}."]
    seen = set()
    for name, hw in hardware.items():
        if hw.gpu.name in seen:
            continue
        seen.add(hw.gpu.name)
        fit = smallest_fit(model, hw, max_tokens)
        have = max(num_gpus[n] for n, h in hardware.items() if h.gpu.name == hw.gpu.name)
        if fit:
            lines.append(f"  {hw.gpu.name}: needs tp={fit[0]} pp={fit[1]} ({fit[0] * fit[1]} GPUs in one node); "
                         f"its nodes have {have}")
    others = []
    for spec in GPU_SPECS.values():
        if spec.name in seen:
            continue
        hw = NodeHardware(spec, spec.memory_gb * 1e9, spec.link_gb_s, spec.cost_per_hour)
        fit = smallest_fit(model, hw, max_tokens)
        if fit:
            others.append((fit[0] * fit[1], f"{fit[0] * fit[1]} x {spec.name} (tp={fit[0]} pp={fit[1]})"))
    if others:
        lines.append("  smallest configurations of other GPU types that would: "
                     + ", ".join(text for _, text in sorted(others)[:4]))
    lines.append("  or plan with --layer-split, which spreads the layers over several nodes")
    return "\n".join(lines)


def slo_unreachable_message(model: ModelSpec, hardware: dict[str, NodeHardware], num_gpus: dict[str, int],
                            latency: LatencyTable, stats: WorkloadStats, slo: SLOSpec,
                            missing_roles: list[str], max_pp: int = max(PARALLEL_SIZES)) -> str:
    """The best zero-load TTFT and TPOT over every configuration that fits (pp <= max_pp)."""
    best_ttft, best_tpot = (np.inf, ""), (np.inf, "")
    for name, hw in hardware.items():
        for tp in PARALLEL_SIZES:
            for pp in PARALLEL_SIZES:
                if pp > max_pp or tp * pp > num_gpus[name] or not fits(model, hw, tp, pp, stats.max_tokens):
                    continue
                c = latency.coefficients(hw, tp, pp)
                label = f"{hw.gpu.name} tp={tp} pp={pp}"
                ttft = float(np.percentile(prefill_service_s(c, stats), slo.ttft_percentile))
                tpot = c.decode_ms(1, stats.decode_context) / 1e3
                best_ttft = min(best_ttft, (ttft, label))
                best_tpot = min(best_tpot, (tpot, label))
    return (f"SLO unreachable: no {' or '.join(missing_roles)} instance meets {slo.describe()} even unloaded. "
            f"Best attainable on this cluster: P{slo.ttft_percentile:g} TTFT {best_ttft[0]:.3f} s "
            f"({best_ttft[1]}, no queueing) against {slo.ttft_s:g} s; TPOT {best_tpot[0]:.4f} s "
            f"({best_tpot[1]}, batch of one) against {slo.tpot_s:g} s")

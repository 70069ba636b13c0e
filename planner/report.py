"""The human-readable summary of a plan that `tandem plan` prints."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from proto.plan import Metrics, Plan

MAX_NODES_SHOWN = 4


def _nodes(names: tuple[str, ...]) -> str:
    counts = Counter(names)
    shown = [f"{n} x{c}" if c > 1 else n for n, c in list(counts.items())[:MAX_NODES_SHOWN]]
    if len(counts) > MAX_NODES_SHOWN:
        shown.append(f"+{len(counts) - MAX_NODES_SHOWN} nodes")
    return ", ".join(shown)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    table = [header, *rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_plan(plan: Plan) -> str:
    slo = plan.slo
    by_type = ", ".join(f"{g} x{n}" for g, n in sorted(plan.gpus_by_type().items()))
    lines = [
        f"Plan for {plan.model.name} ({plan.model.dtype}), objective {plan.objective}: "
        f"{len(plan.nodes)} nodes, {plan.num_gpus} GPUs ({by_type})",
        f"SLO: {slo.describe()}",
        "",
    ]
    if plan.groups:
        rows = [
            [
                g.role,
                g.gpu_type,
                g.tp,
                g.pp,
                g.count,
                g.count * g.gpus_per_instance,
                g.max_batch_size,
                f"{g.capacity_rps:.2f}",
                g.latency_source,
                _nodes(g.nodes),
            ]
            for g in plan.groups
        ]
        lines += _table(["role", "gpu", "tp", "pp", "inst", "gpus", "batch", "req/s each", "latency", "nodes"], rows)
        p_gpus = sum(g.count * g.gpus_per_instance for g in plan.groups if g.role == "prefill")
        d_gpus = sum(g.count * g.gpus_per_instance for g in plan.groups if g.role == "decode")
        lines.append(
            f"prefill:decode = {plan.num_instances('prefill')}:{plan.num_instances('decode')} "
            f"instances, {p_gpus}:{d_gpus} GPUs"
        )
    if plan.stages:
        rows = [
            [
                s.role,
                s.node,
                s.gpu_type,
                s.tp,
                f"{s.layer_start}-{s.layer_end - 1}",
                f"{s.rate_rps:.2f}",
                s.latency_source,
            ]
            for s in plan.stages
        ]
        lines += _table(["role", "node", "gpu", "tp", "layers", "req/s", "latency"], rows)
    lines.append("")
    sim: Metrics | None = plan.simulated
    pred = plan.predicted

    def row(label: str, field: str, digits: int = 3) -> list[str]:
        return [label, _fmt(getattr(pred, field), digits), _fmt(getattr(sim, field), digits) if sim else "-"]

    lines += _table(
        ["", "predicted", "simulated"],
        [
            row("rate (req/s)", "rate_rps", 2),
            row("goodput (req/s)", "goodput_rps", 2),
            row("attainment", "attainment"),
            row(f"P{slo.ttft_percentile:g} TTFT (s)", "ttft_s"),
            row(f"P{slo.tpot_percentile:g} TPOT (s)", "tpot_s"),
        ],
    )
    goodput = pred.goodput_rps or 0.0
    s = plan.solver
    lines += [
        "",
        f"GPUs {plan.num_gpus}, cost ${plan.cost_per_hour:.2f}/h, "
        f"predicted goodput per GPU {goodput / max(plan.num_gpus, 1):.3f} req/s",
        f"solver {s.name}: {s.status}, gap {s.gap:.2%}, {s.solve_time_s:.2f} s, "
        f"{s.num_variables} variables, {s.num_constraints} constraints",
    ]
    c = plan.calibration
    lines.append(
        "capacities: the queueing model's"
        if c is None
        else f"capacities: the queueing model's calibrated by simulation ({c.rounds} round"
        f"{'s' if c.rounds > 1 else ''}): prefill x{c.prefill:.3f}, decode x{c.decode:.3f}"
    )
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)

"""Request by request: the simulator against what a closed loop measured.

    .venv/bin/python -m benchmarks.sim_vs_served docs/bench/closed-loop/two-rounds-c

benchmarks/closed_loop.py replays, at each measured rate, the very requests the planner's
simulation runs at that rate (planner.evaluate.run_requests) and records each one's figures
(`requests-<multiple>x.json`). This runs the simulator on those requests again, with the
instances of the plan that was served and the profile it was planned with, and sets the two
side by side per rate: attainment and the median and P90 of TTFT and TPOT, with the measured
median hand-off (from the first text chunk to the second) beside them. Where they part says which side of the
serving the latency model misses: prefill (TTFT) or decode (TPOT), at the median or only in
the tail.

It writes `sim_vs_served.md` into the loop's folder and prints it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table


def simulator_for(loop_dir: Path, workload: str, round_dir: Path):
    """The plan served in round_dir, its problem (from the loop's files and the profile the
    round planned with), and a Simulator of its instances and routes."""
    from planner.latency.gpus import GPU_TYPES
    from planner.latency.roofline import Profile
    from planner.problem import PlanInputs, prepare
    from planner.simulate.simulator import Simulator
    from planner.simulate.workload import WorkloadSpec
    from proto.cluster import ClusterSpec
    from proto.plan import Plan
    from proto.slo import SLOSpec

    plan = Plan.load(round_dir / "plan.yaml")
    profile = loop_dir / workload / "served-profile.yaml" if round_dir.name == "served" else loop_dir / "profile.yaml"
    inputs = PlanInputs(
        cluster=ClusterSpec.load(loop_dir / "cluster.yaml", GPU_TYPES),
        model=plan.model,
        workload=WorkloadSpec.load(loop_dir / workload / "workload.yaml"),
        slo=SLOSpec.load(loop_dir / "slo.yaml"),
        objective=plan.objective,
        profile=Profile.load(profile),
        block_size=plan.block_size,
    )
    problem = prepare(inputs)
    instances = []
    for group in plan.groups:
        option = next(
            o
            for o in problem.options
            if (o.role, o.gpu_type, o.tp, o.pp) == (group.role, group.gpu_type, group.tp, group.pp)
        )
        # The batch limits the server ran with (a profile other than the plan's may size them otherwise).
        option = replace(option, max_batch_size=group.max_batch_size, max_batched_tokens=group.max_batched_tokens)
        instances += [(node, option) for node in group.nodes]  # a node per instance
    routes = {(r.prefill_node, r.decode_node): r.rate_rps for r in plan.routes}
    sim = Simulator(instances, routes, inputs.cluster, problem.hardware, inputs.model, inputs.block_size)
    return plan, problem, sim


def compare_round(loop_dir: Path, workload: str, round_dir: Path) -> list[list[str]]:
    """One row per measured run of the round: measured / simulated figures."""
    from planner.evaluate import run_requests

    plan, problem, sim = simulator_for(loop_dir, workload, round_dir)
    slo = plan.slo
    rows = []
    runs = [json.loads(p.read_text()) for p in round_dir.glob("requests-*.json")]
    for run in sorted(runs, key=lambda r: r["rate_rps"]):
        rate = run["rate_rps"]
        requests, window = run_requests(
            problem.inputs.workload, problem.trace, problem.stats, slo, rate, len(run["requests"]), seed=0
        )
        if len(requests) != len(run["requests"]):
            raise ValueError(f"{round_dir}: the run at {rate} req/s is not the simulator's sample at that rate")
        simulated = sim.run(requests, window)
        counted = [dict(zip(run["fields"], r, strict=True)) for r in run["requests"]]
        counted = [r for r in counted if r["counted"] and r["ttft_s"] is not None]
        ttft = np.array([r["ttft_s"] for r in counted])
        tpot = np.array([r["tpot_s"] for r in counted])
        handoff = np.array([r["handoff_s"] for r in counted if r["handoff_s"] is not None])
        measured_attainment = float(np.mean((ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)))

        def pair(m: np.ndarray, s: np.ndarray, q: float, scale: float, fmt: str) -> str:
            return f"{np.percentile(m, q) * scale:{fmt}} / {np.percentile(s, q) * scale:{fmt}}"

        rows.append(
            [
                f"{rate:.2f}",
                f"{measured_attainment:.3f} / {simulated.attainment(slo):.3f}",
                pair(ttft, simulated.ttft_s, 50, 1, ".2f"),
                pair(ttft, simulated.ttft_s, 90, 1, ".2f"),
                pair(tpot, simulated.tpot_s, 50, 1e3, ".0f"),
                pair(tpot, simulated.tpot_s, 90, 1e3, ".0f"),
                f"{np.median(handoff) * 1e3:.0f}" if len(handoff) else "-",
            ]
        )
    return rows


HEADER = [
    "rate (req/s)",
    "attainment",
    "TTFT p50 (s)",
    "TTFT p90 (s)",
    "TPOT p50 (ms)",
    "TPOT p90 (ms)",
    "measured hand-off p50 (ms)",
]


def compare(loop_dir: Path) -> str:
    """The markdown of every workload's rounds in loop_dir (measured / simulated)."""
    parts = []
    for workload_dir in sorted(p.parent for p in loop_dir.glob("*/workload.yaml")):
        for round_dir in (workload_dir, workload_dir / "served"):
            if not list(round_dir.glob("requests-*.json")):
                continue
            label = workload_dir.name + (" served" if round_dir.name == "served" else "")
            rows = compare_round(loop_dir, workload_dir.name, round_dir)
            parts.append(f"{label} (measured / simulated, the same requests)\n\n{markdown_table(HEADER, rows)}")
    if not parts:
        raise ValueError(f"{loop_dir}: no measured run recorded its requests (requests-*.json)")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loop_dir", type=Path, help="the --out of a benchmarks.closed_loop run")
    args = parser.parse_args(argv)
    text = compare(args.loop_dir)
    (args.loop_dir / "sim_vs_served.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""Planner scale: MILP solve time and proven gap against cluster size, and the MILP's plan
against a DistServe-style enumeration baseline (goodput per GPU, by simulation).

    .venv/bin/python benchmarks/planner_scale.py                       # all clusters
    .venv/bin/python benchmarks/planner_scale.py --trace ../shared/data/azure-llm-2023/conv.csv
    .venv/bin/python benchmarks/planner_scale.py --clusters helix-8 --no-sim

Prints a table, writes results JSON and a PNG (solve time against GPUs) to --out-dir.
Clusters mix GPU types as Helix's A100/V100/L4/T4 clusters and Splitwise's H100+A100 do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.evaluate import simulated_goodput  # noqa: E402
from planner.latency.models import ARCHITECTURES  # noqa: E402
from planner.problem import PlanInputs, place, prepare  # noqa: E402
from planner.simulate.workload import LengthDist, WorkloadSpec  # noqa: E402
from planner.solve.enumeration import distserve_placement  # noqa: E402
from planner.solve.milp import Placement  # noqa: E402
from planner.solve.solver import SolveOptions  # noqa: E402
from proto.cluster import ClusterSpec  # noqa: E402
from proto.slo import SLOSpec  # noqa: E402


def _nodes(*groups: tuple[str, str, int, int, float]) -> dict[str, Any]:
    return {
        "nodes": [
            {"name": name, "gpu_type": gpu, "count": count, "num_gpus": gpus, "nic_gb_s": nic}
            for name, gpu, count, gpus, nic in groups
        ]
    }


def _two_sites(cluster: dict[str, Any]) -> dict[str, Any]:
    names = ClusterSpec.from_dict(cluster).nodes
    near = [n.name for n in names if n.gpu_type in ("L4", "T4")]
    far = [n.name for n in names if n.gpu_type in ("H100", "A100-80GB")]
    return {**cluster, "links": [{"a": a, "b": b, "gb_s": 1.0} for a in near for b in far]}


HELIX_42 = _nodes(
    ("h100", "H100", 6, 8, 50),
    ("a100", "A100-80GB", 6, 8, 25),
    ("v100", "V100", 10, 4, 12.5),
    ("l4", "L4", 10, 4, 6.25),
    ("t4", "T4", 10, 4, 6.25),
)

# name -> (cluster, model): Helix-like mixes serve a 13B model (it fits a T4 node), the
# H100/A100 clusters a 70B one.
CLUSTERS: dict[str, tuple[dict[str, Any], str]] = {
    "helix-8": (
        _nodes(
            ("a100", "A100-80GB", 2, 8, 25),
            ("v100", "V100", 2, 4, 12.5),
            ("l4", "L4", 2, 4, 6.25),
            ("t4", "T4", 2, 4, 6.25),
        ),
        "llama-2-13b",
    ),
    "helix-24": (
        _nodes(
            ("a100", "A100-80GB", 4, 8, 25),
            ("v100", "V100", 4, 8, 12.5),
            ("l4", "L4", 8, 4, 6.25),
            ("t4", "T4", 8, 4, 6.25),
        ),
        "llama-2-13b",
    ),
    "helix-42": (HELIX_42, "llama-2-13b"),
    # The same 42 nodes in two sites: the L4/T4 nodes reach the H100/A100 nodes over 1 GB/s
    # links (1,722 pairwise route variables instead of the NIC hub).
    "helix-42-sites": (_two_sites(HELIX_42), "llama-2-13b"),
    "splitwise-16": (_nodes(("h100", "H100", 8, 8, 50), ("a100", "A100-80GB", 8, 8, 25)), "llama-2-70b"),
    "mixed-128": (
        _nodes(
            ("h100", "H100", 32, 8, 50),
            ("a100", "A100-80GB", 48, 8, 25),
            ("l40s", "L40S", 24, 8, 12.5),
            ("a10g", "A10G", 24, 8, 6.25),
        ),
        "llama-2-70b",
    ),
}


SLO = SLOSpec(ttft_s=2.0, tpot_s=0.1, ttft_percentile=90, tpot_percentile=90, attainment=0.9)
SYNTHETIC = WorkloadSpec(
    rate_rps=10.0,
    input_tokens=LengthDist("lognormal", median=1000, sigma=0.6, max=4096),
    output_tokens=LengthDist("lognormal", median=130, sigma=0.8, max=1000),
)


def gpus(p: Placement, options) -> int:
    return sum(c * options[i].num_gpus for (_, i), c in p.counts.items())


def run_case(name: str, workload: WorkloadSpec, solve_options: SolveOptions, sim_requests: int) -> dict:
    cluster_dict, model = CLUSTERS[name]
    cluster = ClusterSpec.from_dict(cluster_dict)
    inputs = PlanInputs(cluster=cluster, model=ARCHITECTURES[model], workload=workload, slo=SLO)
    start = time.perf_counter()
    problem = prepare(inputs)
    prepare_s = time.perf_counter() - start
    placement, options = place(problem, solve_options)
    total_s = time.perf_counter() - start
    baseline = distserve_placement(cluster, problem.hardware, problem.options, problem.traffic)
    row = {
        "cluster": name,
        "model": model,
        "nodes": len(cluster.nodes),
        "gpus": cluster.num_gpus,
        "solver": placement.solver.name,
        "status": placement.solver.status,
        "gap": placement.solver.gap,
        "solve_s": placement.solver.solve_time_s,
        "prepare_s": round(prepare_s, 2),
        "total_s": round(total_s, 2),
        "variables": placement.solver.num_variables,
        "milp_goodput": placement.rate_rps,
        "milp_gpus": gpus(placement, options),
        "baseline_goodput": baseline.rate_rps,
        "baseline_gpus": gpus(baseline, problem.options),
    }
    if sim_requests:
        row["milp_sim_goodput"] = simulated_goodput(problem, placement, options, sim_requests)
        row["baseline_sim_goodput"] = (
            simulated_goodput(problem, baseline, problem.options, sim_requests) if baseline.rate_rps > 0 else 0.0
        )
    return row


def _figures(row: dict, kind: str) -> str:
    """A solver's GPUs used / predicted goodput / simulated goodput, for one row."""
    sim = row.get(f"{kind}_sim_goodput")
    return f"{row[f'{kind}_gpus']} / {row[f'{kind}_goodput']:.1f} / " + ("-" if sim is None else f"{sim:.1f}")


def print_table(rows: list[dict]) -> None:
    """Goodput in req/s; "per GPU" divides by all of the cluster's GPUs (the cluster is given)."""
    head = (
        "cluster",
        "model",
        "nodes",
        "GPUs",
        "solve s",
        "total s",
        "gap",
        "status",
        "MILP used/pred/sim",
        "baseline used/pred/sim",
        "sim req/s per GPU: MILP, baseline",
    )
    lines = [head]
    for r in rows:
        per_gpu = "-"
        if "milp_sim_goodput" in r:
            per_gpu = f"{r['milp_sim_goodput'] / r['gpus']:.3f}, {r['baseline_sim_goodput'] / r['gpus']:.3f}"
        lines.append(
            (
                r["cluster"],
                r["model"],
                str(r["nodes"]),
                str(r["gpus"]),
                f"{r['solve_s']:.2f}",
                f"{r['total_s']:.2f}",
                f"{r['gap']:.2%}",
                r["status"],
                _figures(r, "milp"),
                _figures(r, "baseline"),
                per_gpu,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def plot(rows: list[dict], path: Path, gap: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["gpus"] for r in rows], [r["solve_s"] for r in rows], marker="o", label="MILP solve")
    ax.scatter([r["gpus"] for r in rows], [r["total_s"] for r in rows], marker="s", label="prepare + solve")
    for r in rows:
        ax.annotate(r["cluster"], (r["gpus"], r["total_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(60, color="grey", linestyle=":", linewidth=1)
    ax.annotate("60 s", (rows[0]["gpus"], 60), fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GPUs in the cluster")
    ax.set_ylabel("seconds (2 threads)")
    ax.set_title(f"tandem plan: time to a plan within {gap:.2%} proven gap")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", nargs="*", default=list(CLUSTERS), choices=list(CLUSTERS))
    parser.add_argument("--trace", help="Azure-format trace CSV for the workload (default: synthetic)")
    parser.add_argument("--gap", type=float, default=0.01, help="relative gap to stop at (default 0.01)")
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--solver", choices=("auto", "highs", "cbc"), default="auto")
    parser.add_argument("--sim-requests", type=int, default=3000, help="per simulation; 0 skips simulation")
    parser.add_argument("--no-sim", action="store_true", help="same as --sim-requests 0")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    workload = WorkloadSpec(trace=args.trace) if args.trace else SYNTHETIC
    sim_requests = 0 if args.no_sim else args.sim_requests
    rows = []
    for name in args.clusters:
        print(f"{name} ...", file=sys.stderr, flush=True)
        solve_options = SolveOptions(time_limit_s=args.time_limit, gap_rel=args.gap, threads=2, solver=args.solver)
        rows.append(run_case(name, workload, solve_options, sim_requests))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planner_scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "planner_scale.png", args.gap)
    print(f"wrote {out / 'planner_scale.json'} and {out / 'planner_scale.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

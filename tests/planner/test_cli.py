"""`tandem plan` end to end: files in, table or JSON out, a plan file that loads."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest

from deploy.cli import main
from proto.plan import Plan, SolverInfo
from tests.planner.inputs import GENEROUS_TIME_LIMIT_S

CLUSTER = {
    "nodes": [
        {"name": "h100", "gpu_type": "H100", "num_gpus": 2, "nic_gb_s": 50},
        {"name": "a100", "count": 2, "gpu_type": "A100-80GB", "num_gpus": 2, "nic_gb_s": 25},
    ]
}
WORKLOAD = {
    "rate_rps": 4.0,
    "input_tokens": {"distribution": "lognormal", "median": 800, "sigma": 0.5, "max": 3000},
    "output_tokens": {"distribution": "uniform", "min": 20, "max": 300},
}
SLO = {"ttft_s": 0.4, "tpot_s": 0.1, "ttft_percentile": 90, "tpot_percentile": 90, "attainment": 0.9}


@pytest.fixture
def files(write_yaml):
    return {
        "--cluster": write_yaml("cluster.yaml", CLUSTER),
        "--workload": write_yaml("workload.yaml", WORKLOAD),
        "--slo": write_yaml("slo.yaml", SLO),
    }


def argv(files: dict, *extra: str) -> list[str]:
    # A generous time limit: these solves take a second; on a slow or loaded machine they
    # take longer and still prove the same plan (tests must not race the solver). Without the
    # goodput search there is no calibration either (tens of simulations) unless a test asks.
    return [
        "plan",
        "--model",
        "llama-2-7b",
        *[x for kv in files.items() for x in kv],
        "--sim-requests",
        "300",
        "--no-goodput-search",
        "--time-limit",
        str(GENEROUS_TIME_LIMIT_S),
        *extra,
    ]


def test_plan_writes_a_table_and_a_plan_file(files, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(argv(files, "--out", str(out))) == 0
    captured = capsys.readouterr()
    assert "prefill:decode =" in captured.out and "predicted  simulated" in captured.out
    assert "solver HiGHS: optimal" in captured.out
    # Calibrated plans (`--calibrate-rounds`) through this command: tests/benchmarks/test_closed_loop.py.
    assert "capacities: the queueing model's\n" in captured.out
    assert "MILP (HiGHS)" in captured.err and "simulating at" in captured.err
    plan = Plan.load(out)
    assert plan.num_instances("prefill") >= 1 and plan.num_instances("decode") >= 1
    assert plan.simulated is not None and plan.simulated.goodput_rps is None
    assert plan.predicted.goodput_rps == pytest.approx(plan.solver.objective, rel=1e-6)
    assert {g.gpu_type for g in plan.groups} <= {"H100", "A100-80GB"}
    assert plan.solver.gap <= 0.005
    assert all(g.pp == 1 for g in plan.groups)  # --max-pp 1 by default: a plan tandem serve runs
    plan.check_servable()


def test_plan_emits_json_for_machines(files, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(argv(files, "--out", str(out), "--emit", "json", "--objective", "cost", "--target-rate", "3")) == 0
    emitted = json.loads(capsys.readouterr().out)
    assert Plan.from_dict(emitted) == Plan.load(out)
    assert emitted["objective"] == "cost" and emitted["predicted"]["rate_rps"] == 3
    assert emitted["calibration"] is None  # --no-goodput-search: no calibration either, unless asked
    assert emitted["predicted"]["goodput_rps"] >= 3


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"nodes": [{"name": "x", "gpu_type": "A100", "num_gpus": 2}]}, "cluster.nodes[0].gpu_type"),
        ({"nodes": [{"name": "x", "gpu_type": "L4", "num_gpu": 2}]}, "cluster.nodes[0].num_gpu is not a known field"),
    ],
)
def test_user_errors_exit_2_naming_the_field(files, write_yaml, capsys, bad, field):
    files["--cluster"] = write_yaml("bad.yaml", bad)
    assert main(argv(files)) == 2
    assert field in capsys.readouterr().err


def test_layer_split_plans_a_model_that_fits_no_node(files, write_yaml, tmp_path):
    files["--cluster"] = write_yaml(
        "c.yaml", {"nodes": [{"name": "a", "count": 4, "gpu_type": "A100-40GB", "num_gpus": 2, "nic_gb_s": 25}]}
    )
    files["--slo"] = write_yaml("s.yaml", {"ttft_s": 3.0, "tpot_s": 0.25})
    args = argv(files, "--out", str(tmp_path / "p.yaml"))
    args[2] = "llama-2-70b"
    assert main(args) == 2  # no single 2 x 40 GB node holds 138 GB of weights
    assert main(args + ["--layer-split"]) == 0
    plan = Plan.load(tmp_path / "p.yaml")
    assert plan.solver.status == "optimal"  # proven, however long the machine took
    for role in ("prefill", "decode"):
        stages = sorted((s for s in plan.stages if s.role == role), key=lambda s: s.layer_start)
        assert stages[0].layer_start == 0 and stages[-1].layer_end == 80
        assert all(a.layer_end == b.layer_start for a, b in pairwise(stages))
    assert plan.predicted.goodput_rps > 0
    assert {s.latency_source for s in plan.stages} == {"roofline"}


def _profile_entry(gpu_type: str, tp: int) -> dict:
    from planner.latency.gpus import node_hardware
    from planner.latency.models import ARCHITECTURES
    from planner.latency.roofline import roofline
    from proto.cluster import NodeSpec

    c = roofline(ARCHITECTURES["llama-2-7b"], node_hardware(NodeSpec("n", "A100-80GB", 2)), tp, 1)
    return {
        "gpu_type": gpu_type,
        "tp": tp,
        "pp": 1,
        "prefill_ms": {"a": c.a, "b": c.b, "c": c.c},
        "decode_ms": {"A": c.A, "B": c.B, "C": c.C},
    }


def test_plan_says_where_each_groups_latencies_come_from(files, write_yaml, tmp_path, capsys):
    # The A100 configurations are profiled (with the roofline's figures); the H100 ones are not.
    profile = {"model": "llama-2-7b", "entries": [_profile_entry("A100-80GB", tp) for tp in (1, 2)]}
    files["--profile"] = write_yaml("profile.yaml", profile)
    assert main(argv(files, "--out", str(tmp_path / "p.yaml"))) == 0
    plan = Plan.load(tmp_path / "p.yaml")
    assert {(g.gpu_type, g.latency_source) for g in plan.groups} == {("A100-80GB", "profile"), ("H100", "roofline")}
    table = capsys.readouterr().out.splitlines()
    assert table[3].split()[-2:] == ["latency", "nodes"]
    assert any(row.startswith(("prefill", "decode")) and "A100-80GB" in row and " profile " in row for row in table)


def test_profile_entry_matching_no_node_is_an_error(files, write_yaml, tmp_path, capsys):
    profile = {"model": "llama-2-7b", "entries": [_profile_entry("A100-80GB", 1), _profile_entry("A100-80G", 2)]}
    files["--profile"] = write_yaml("profile.yaml", profile)
    assert main(argv(files, "--out", str(tmp_path / "p.yaml"))) == 2
    assert (
        "profile.entries[1].gpu_type 'A100-80G' matches no node of the cluster; its GPU types: H100, A100-80GB"
    ) in capsys.readouterr().err


def test_plan_from_a_trace(files, write_yaml, tmp_path):
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.0000000,{300 + 37 * (i % 20)},{10 + 9 * (i % 13)}"
        for i in range(200)
    ]
    (tmp_path / "trace.csv").write_text("\n".join(rows) + "\n")
    files["--workload"] = write_yaml("trace-workload.yaml", {"trace": "trace.csv"})
    assert main(argv(files, "--out", str(tmp_path / "p.yaml"), "--objective", "cost")) == 0
    plan = Plan.load(tmp_path / "p.yaml")
    assert plan.predicted.rate_rps == pytest.approx(1.0, rel=0.01)  # the trace's own rate: one per second
    assert plan.predicted.goodput_rps >= 1.0


def _stopped(status: str):
    """A solve that hit its time limit before setting any variable: status no_solution, or
    time_limit with nothing better than the empty incumbent."""

    def solve(problem, options, progress=None):
        return SolverInfo(
            name="HiGHS",
            status=status,
            gap=float("inf") if status == "no_solution" else 1.0,
            solve_time_s=options.time_limit_s,
            objective=0.0,
        )

    return solve


@pytest.mark.parametrize("status", ["no_solution", "time_limit"])
@pytest.mark.parametrize("layer_split", [False, True])
def test_a_solve_stopped_by_its_time_limit_says_so(
    files, write_yaml, tmp_path, capsys, monkeypatch, status, layer_split
):
    import planner.solve.layer_split
    import planner.solve.milp

    monkeypatch.setattr(planner.solve.layer_split if layer_split else planner.solve.milp, "solve", _stopped(status))
    args = argv(files, "--out", str(tmp_path / "p.yaml"), "--time-limit", "7") + (["--layer-split"] * layer_split)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the solver stopped at its time limit (7 s)" in err and "raise --time-limit" in err
    assert "places nothing" not in err and "nic_gb_s" not in err and "no layer split serves" not in err
    assert not (tmp_path / "p.yaml").exists()


def test_a_plan_from_a_solve_stopped_by_its_time_limit_warns(files, tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    import planner.solve.milp
    from planner.solve.solver import solve

    monkeypatch.setattr(
        planner.solve.milp, "solve", lambda *a, **k: replace(solve(*a, **k), status="time_limit", gap=0.04)
    )
    assert main(argv(files, "--out", str(tmp_path / "p.yaml"), "--time-limit", "7")) == 0
    captured = capsys.readouterr()
    warning = (
        "the solver stopped at its time limit (7 s) with a proven gap of 4.00%: a better plan may serve up "
        "to 4.00% more; raise --time-limit (or --gap) to prove it"
    )
    assert f"warning: {warning}" in captured.err and f"warning: {warning}" in captured.out
    assert Plan.load(tmp_path / "p.yaml").warnings == (warning,)

"""The closed loop's plumbing on the tiny model: every stage runs on its predecessor's output
and results.json has its shape. Timings are not checked: the profile's step times are made
up (the engine's steps run, the clock is fixed), the serving is real."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray", reason="ray is not installed")

from engine.cores import available_cores  # noqa: E402

FIGURES = {"attainment", "p90_ttft_s", "p90_tpot_s", "goodput_rps"}


@pytest.fixture
def made_up_profile(monkeypatch):
    from planner.latency import profile as profile_module

    def timed_step(engine):
        out = engine.schedule()
        engine.run(out)
        return 20.0 + 0.2 * out.num_batched_tokens + 2.0 * len(out.scheduled), out

    monkeypatch.setattr(profile_module, "_timed_step", timed_step)


@pytest.mark.skipif(len(available_cores()) < 2, reason="a prefill and a decode worker need a core each")
def test_the_loop_profiles_plans_serves_and_replays(tmp_path, tiny_llama_dir, made_up_profile, capsys):
    from benchmarks import closed_loop
    from planner.simulate.workload import WorkloadSpec
    from proto.plan import Plan

    out = tmp_path / "loop"
    closed_loop.main(
        [
            "--out",
            str(out),
            "--model",
            str(tiny_llama_dir),
            "--workloads",
            "bursty",
            "--num-requests",
            "8",
            "--rate-multiples",
            "1",
            "--extra-rates",
            "0",
            "--calibrate-rounds",
            "1",
            "--profile-repeats",
            "1",
            "--max-prompt",
            "256",
            "--rounds",
            "1",
        ]
    )
    # One round: the second plans with the real steps served, which a loaded machine can make
    # too slow for the SLO these made-up timings set (the refit is tested in tests/planner).
    run = json.loads((out / "run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == ["profile", "plan bursty", "serve bursty", "bench bursty"]
    results = json.loads((out / "bursty" / "results.json").read_text())
    assert set(results) == {"forecast", "simulated", "measured", "rounds"}
    assert {k: results[k] for k in ("forecast", "simulated", "measured")} == results["rounds"]["alone"]
    for source in ("forecast", "simulated", "measured"):
        assert set(results[source]) == FIGURES
        assert 0 <= results[source]["attainment"] <= 1 and min(results[source].values()) >= 0
    plan = Plan.load(out / "bursty" / "plan.yaml")  # planned for the cores, from a one-core profile
    assert {(g.gpu_type, g.tp, g.latency_source) for g in plan.groups} == {("cpu", 1, "profile")}
    assert plan.num_instances("prefill") == plan.num_instances("decode") == 1
    (at_plan,) = run["sweeps"]["bursty"]  # one measured run, at the plan's rate, every request served
    assert at_plan["rate_rps"] == pytest.approx(plan.predicted.rate_rps, rel=1e-3)
    assert at_plan["counted"] > 0 and at_plan["failed"] == 0
    assert (WorkloadSpec.load(out / "bursty" / "workload.yaml").cv or 1.0) == 2.0
    assert "MILP forecast" in (out / "table.md").read_text() and (out / "plot.png").stat().st_size > 0
    assert "profile: tandem profile" in capsys.readouterr().out

    # The measured run recorded its requests; the simulator replays the same ones beside them.
    from benchmarks import sim_vs_served

    recorded = json.loads((out / "bursty" / "requests-1x.json").read_text())
    assert len(recorded["requests"]) == at_plan["requests"]
    assert sum(1 for r in recorded["requests"] if r[recorded["fields"].index("counted")]) == at_plan["counted"]
    sim_vs_served.main([str(out)])
    row = f"| {at_plan['rate_rps']:.2f} |"
    rows = [line for line in (out / "sim_vs_served.md").read_text().splitlines() if line.startswith(row)]
    assert len(rows) == 1 and " / " in rows[0]  # measured / simulated

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
    from deploy.cli import main as tandem
    from planner.latency.roofline import Profile
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
        ]
    )
    run = json.loads((out / "run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == [
        "profile",
        "plan bursty",
        "serve bursty",
        "bench bursty",
        "refit bursty",
        "plan bursty served",
        "serve bursty served",
        "bench bursty served",
    ]
    results = json.loads((out / "bursty" / "results.json").read_text())
    assert set(results) == {"forecast", "simulated", "measured", "rounds", "served_fit"}
    assert set(results["rounds"]) == {"alone", "served"}
    assert {k: results[k] for k in ("forecast", "simulated", "measured")} == results["rounds"]["served"]
    for figures in [results[k] for k in ("forecast", "simulated", "measured")] + [results["rounds"]["alone"]]:
        for source in ("forecast", "simulated", "measured") if "forecast" in figures else ("",):
            f = figures[source] if source else figures
            assert set(f) == FIGURES
            assert 0 <= f["attainment"] <= 1 and min(f.values()) >= 0
    # The refit saw the steps each role served: prefills on the prefill worker, decodes on the other.
    fit = results["served_fit"]
    assert fit["prefill"]["steps"] > 0 and fit["decode"]["steps"] > 0
    assert fit["prefill"]["served_over_base"] > 0 and fit["decode"]["served_over_base"] > 0
    served_profile = Profile.load(out / "bursty" / "served-profile.yaml")
    assert served_profile.find("cpu", 1, 1) is not None
    # Each round's steps are saved as POST /admin/steps answers them: the CLI refits from them too.
    for steps in (out / "bursty" / "steps.json", out / "bursty" / "served" / "steps.json"):
        again = tmp_path / "again.yaml"
        assert (
            tandem(["profile", "--from-steps", str(steps), "--base", str(out / "profile.yaml"), "--out", str(again)])
            == 0
        )
        assert Profile.load(again).find("cpu", 1, 1) is not None
    for plan_file, label in (
        (out / "bursty" / "plan.yaml", "bursty"),
        (out / "bursty" / "served" / "plan.yaml", "bursty served"),
    ):
        plan = Plan.load(plan_file)  # planned for the cores, from a one-core profile
        assert {(g.gpu_type, g.tp, g.latency_source) for g in plan.groups} == {("cpu", 1, "profile")}
        assert plan.num_instances("prefill") == plan.num_instances("decode") == 1
        assert plan.calibration is not None and plan.simulated.goodput_rps is not None
        (at_plan,) = run["sweeps"][label]  # one measured run, at the plan's rate, every request served
        assert at_plan["rate_rps"] == pytest.approx(plan.predicted.rate_rps, rel=1e-3)
        assert at_plan["counted"] > 0 and at_plan["failed"] == 0
    assert (WorkloadSpec.load(out / "bursty" / "workload.yaml").cv or 1.0) == 2.0
    assert "MILP forecast" in (out / "table.md").read_text() and (out / "plot.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "profile: tandem profile" in printed and "bench bursty served" in printed
    assert "capacities: the queueing model's calibrated by simulation (1 round)" in printed

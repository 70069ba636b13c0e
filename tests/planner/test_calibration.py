"""The capacity model calibrated by the simulator: the plan's own forecast and the
simulation agree, for Poisson and for bursty arrivals."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner.planning import make_plan
from planner.problem import place, prepare
from planner.simulate.calibration import calibrated, highest_rate
from planner.solve.milp import solve_placement
from planner.solve.predict import predict
from planner.solve.solver import SolveOptions
from tests.planner.inputs import GENEROUS_TIME_LIMIT_S, SLO, WORKLOAD, make_inputs

OPTIONS = SolveOptions(time_limit_s=GENEROUS_TIME_LIMIT_S)
MIXED = [{"name": "a100", "gpu_type": "A100-80GB", "num_gpus": 2}, {"name": "l4", "gpu_type": "L4", "num_gpus": 4}]
NUM_SIM_REQUESTS = 1000


def agreement(plan) -> tuple[float, float]:
    """Relative gaps between forecast and simulation: goodput, and attainment at the plan's rate."""
    p, s = plan.predicted, plan.simulated
    return abs(p.goodput_rps - s.goodput_rps) / s.goodput_rps, abs(p.attainment - s.attainment) / s.attainment


def test_the_queueing_model_alone_disagrees_with_the_simulator():
    # Why calibration exists: the model sizes every prefill queue on its own and one prompt
    # at a time, while the router pools them and the scheduler batches prompts.
    plan = make_plan(make_inputs(MIXED), OPTIONS, num_sim_requests=NUM_SIM_REQUESTS, calibration_rounds=0)
    assert plan.calibration is None
    assert plan.simulated.goodput_rps > 1.1 * plan.predicted.goodput_rps


@pytest.mark.parametrize("cv", [1.0, 2.0])
def test_calibrated_forecast_agrees_with_the_simulator(cv):
    # The plan's simulated figures come from other requests (another seed) than the
    # calibration's, so this checks the calibrated model, not the simulations it was fitted to.
    workload = replace(WORKLOAD, cv=cv)
    messages = []
    plan = make_plan(
        make_inputs(MIXED, workload=workload), OPTIONS, num_sim_requests=NUM_SIM_REQUESTS, progress=messages.append
    )
    goodput_gap, attainment_gap = agreement(plan)
    assert goodput_gap <= 0.10 and attainment_gap <= 0.10
    assert 1 <= plan.calibration.rounds <= 3
    assert any(m.startswith("calibration round 1: prefill alone") for m in messages)
    assert any(m.endswith("converged") for m in messages) or plan.calibration.rounds == 3
    assert all(g.capacity_rps > 0 for g in plan.groups)


def test_forecast_falls_as_arrivals_get_burstier():
    capacity = {}
    for cv in (0.5, 1.0, 2.0, 3.0):
        problem = prepare(make_inputs(MIXED, workload=replace(WORKLOAD, cv=cv)))
        placement, _ = place(problem, OPTIONS)
        capacity[cv] = ({o.role: 0.0 for o in problem.options}, placement.rate_rps)
        for o in problem.options:
            capacity[cv][0][o.role] += o.capacity_rps
    for role in ("prefill", "decode"):
        by_cv = [capacity[cv][0][role] for cv in (0.5, 1.0, 2.0, 3.0)]
        assert by_cv == sorted(by_cv, reverse=True) and by_cv[0] > by_cv[-1]
    rates = [capacity[cv][1] for cv in (0.5, 1.0, 2.0, 3.0)]
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.8 * rates[1]


def test_a_calibrated_option_forecasts_at_its_rate_over_the_factor():
    problem = prepare(make_inputs(MIXED))
    placement, options = place(problem, OPTIONS)
    scaled = calibrated(options, {"prefill": 1.5, "decode": 1.2})
    assert [o.capacity_rps for o in scaled] == pytest.approx(
        [o.capacity_rps * (1.5 if o.role == "prefill" else 1.2) for o in options]
    )
    # Both roles scaled alike: what the model forecast at r, the calibrated plan forecasts at 1.5 r.
    same = calibrated(options, {"prefill": 1.5, "decode": 1.5})
    r = placement.rate_rps
    assert predict(placement, same, problem.stats, SLO, 1.5 * r).ttft_s == pytest.approx(
        predict(placement, options, problem.stats, SLO, r).ttft_s, rel=1e-3
    )


def test_a_placement_keeps_its_instances_under_calibrated_capacities():
    problem = prepare(make_inputs(MIXED))
    placement, options = place(problem, OPTIONS)
    inputs = problem.inputs
    routed = solve_placement(
        inputs.cluster,
        problem.hardware,
        calibrated(options, {"prefill": 2.0, "decode": 2.0}),
        problem.traffic,
        "goodput",
        None,
        OPTIONS,
        fixed_counts=placement.counts,
    )
    assert routed.counts == placement.counts
    assert routed.rate_rps == pytest.approx(2 * placement.rate_rps, rel=1e-6)
    # Both roles halved: the same instances serve half as much.
    halved = solve_placement(
        inputs.cluster,
        problem.hardware,
        calibrated(options, {"prefill": 0.5, "decode": 0.5}),
        problem.traffic,
        "goodput",
        None,
        OPTIONS,
        fixed_counts=placement.counts,
    )
    assert halved.rate_rps == pytest.approx(placement.rate_rps / 2, rel=1e-6)


@pytest.mark.parametrize("start", [1.0, 7.0, 40.0])
def test_highest_rate_brackets_then_bisects(start):
    found = highest_rate(lambda rate: rate <= 7.3, start)
    assert 7.3 * 0.97 <= found <= 7.3
    assert highest_rate(lambda rate: False, start) == 0.0

"""From inputs to a plan: what make_plan says beside the figures (warnings, progress)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from planner.evaluate import simulated_goodput
from planner.planning import make_plan, simulation_warning
from planner.problem import place, prepare
from planner.report import format_plan
from planner.solve.predict import predict
from planner.solve.solver import SolveOptions
from proto.plan import Metrics
from proto.slo import SLOSpec
from tests.planner.inputs import GENEROUS_TIME_LIMIT_S, make_inputs

OPTIONS = SolveOptions(time_limit_s=GENEROUS_TIME_LIMIT_S)
MIXED = [
    {"name": "a100", "gpu_type": "A100-80GB", "num_gpus": 2},
    {"name": "l4", "gpu_type": "L4", "num_gpus": 4},
    {"name": "t4", "gpu_type": "T4", "num_gpus": 2},
]


def test_forecast_below_the_goal_warns_with_the_rate_that_meets_it():
    # P90 targets with a 99% goal: capacities hold the P90s, so at the planned rate about
    # one request in ten misses; a lower rate meets the goal.
    slo = SLOSpec(ttft_s=0.4, tpot_s=0.1, attainment=0.99)
    messages = []
    plan = make_plan(make_inputs(MIXED, slo=slo), OPTIONS, num_sim_requests=0, progress=messages.append)
    assert plan.predicted.attainment < 0.99
    (warning,) = plan.warnings
    assert f"forecast attainment {plan.predicted.attainment:.3f}" in warning and "below the goal 0.990" in warning
    rate = float(re.search(r"meets the goal up to ([\d.]+) req/s", warning).group(1))
    assert 0 < rate < plan.predicted.rate_rps
    problem = prepare(make_inputs(MIXED, slo=slo))
    placement, options = place(problem, OPTIONS)
    assert predict(placement, options, problem.stats, slo, rate).attainment >= 0.99 - 5e-4
    assert predict(placement, options, problem.stats, slo, rate * 1.02).attainment < 0.99
    assert f"warning: {warning}" in messages
    assert f"warning: {warning}" in format_plan(plan)


def test_forecast_meeting_the_goal_has_no_warning():
    plan = make_plan(
        make_inputs(MIXED, slo=SLOSpec(ttft_s=0.4, tpot_s=0.1, attainment=0.8)), OPTIONS, num_sim_requests=0
    )
    assert plan.predicted.attainment >= 0.8 and plan.warnings == ()


def test_a_simulation_below_the_goal_at_the_planned_rate_warns():
    slo = SLOSpec(ttft_s=0.4, tpot_s=0.1, attainment=0.9)
    missed = Metrics(rate_rps=62.35, goodput_rps=58.45, attainment=0.491, ttft_s=1.041, tpot_s=0.052)
    warning = simulation_warning(missed, slo, calibrated=True)
    assert warning is not None
    assert warning.startswith("the simulation attains 0.491 at the planned 62.35 req/s, below the goal 0.900")
    assert "meets the goal up to 58.45 req/s (94% of the plan): serve at most that" in warning
    assert "more --sim-requests" in warning
    assert "--calibrate-rounds" in simulation_warning(replace(missed, goodput_rps=None), slo, calibrated=False)
    assert simulation_warning(replace(missed, attainment=0.9), slo, calibrated=True) is None


def test_goodput_search_reports_every_simulation():
    problem = prepare(make_inputs([{"name": "a100", "gpu_type": "A100-80GB", "num_gpus": 2}]))
    placement, options = place(problem, OPTIONS)
    messages = []
    goodput = simulated_goodput(problem, placement, options, num_requests=200, num_steps=3, progress=messages.append)
    steps = [
        re.fullmatch(r"  goodput search: ([\d.]+) req/s -> attainment ([\d.]+) \((meets|misses) the goal\)", m)
        for m in messages
    ]
    assert all(steps) and len(steps) >= 4  # the bracket's simulations, then 3 bisection steps
    rates = [float(m.group(1)) for m in steps]
    assert rates[0] == pytest.approx(placement.rate_rps, abs=0.01)
    for m in steps:
        assert (m.group(3) == "meets") == (float(m.group(2)) >= problem.inputs.slo.attainment)
    assert goodput == pytest.approx(
        max([0.0] + [r for r, m in zip(rates, steps, strict=True) if m.group(3) == "meets"]), abs=0.01
    )

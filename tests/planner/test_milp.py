"""The placement MILP equals exhaustive enumeration; infeasible inputs say why."""

from __future__ import annotations

import pytest

from planner.problem import place, prepare
from planner.solve.capacity import prune_dominated
from planner.solve.enumeration import distserve_placement, exhaustive_placement, served_rate
from planner.solve.milp import solve_placement
from planner.solve.solver import SolveOptions
from proto.slo import SLOSpec
from tests.planner.inputs import GENEROUS_TIME_LIMIT_S, SLO, make_inputs

EXACT = SolveOptions(time_limit_s=GENEROUS_TIME_LIMIT_S, gap_rel=1e-9)

MIXED = [
    {"name": "a100", "gpu_type": "A100-80GB", "num_gpus": 2},
    {"name": "l4", "gpu_type": "L4", "num_gpus": 4},
    {"name": "t4", "gpu_type": "T4", "num_gpus": 2},
]
SLOW = [dict(n, nic_gb_s=0.5) for n in MIXED]
SPLITWISE = [
    {"name": "h100", "gpu_type": "H100", "num_gpus": 2},
    {"name": "a100-0", "gpu_type": "A100-80GB", "num_gpus": 2},
    {"name": "a100-1", "gpu_type": "A100-80GB", "num_gpus": 2},
]
LINKED = [dict(n, nic_gb_s=50) for n in SPLITWISE]

CASES = {
    "mixed": (MIXED, []),
    "slow-nics": (SLOW, []),
    "splitwise": (SPLITWISE, []),
    "slow-link": (LINKED, [{"a": "h100", "b": "a100-1", "gb_s": 0.5}]),
    "cut-link": (LINKED, [{"a": "h100", "b": "a100-0", "gb_s": 0}, {"a": "h100", "b": "a100-1", "gb_s": 0}]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_goodput_equals_exhaustive_enumeration(case):
    nodes, links = CASES[case]
    problem = prepare(make_inputs(nodes, links))
    milp = solve_placement(
        problem.inputs.cluster,
        problem.hardware,
        prune_dominated(problem.options),
        problem.traffic,
        "goodput",
        None,
        EXACT,
    )
    brute = exhaustive_placement(problem.inputs.cluster, problem.hardware, problem.options, problem.traffic, "goodput")
    assert milp.solver.status == "optimal"
    assert brute.rate_rps > 0
    assert milp.rate_rps == pytest.approx(brute.rate_rps, rel=1e-6)
    assert milp.solver.objective == pytest.approx(brute.rate_rps, rel=1e-6)


@pytest.mark.parametrize("case", ["mixed", "splitwise", "slow-link"])
def test_cost_equals_exhaustive_enumeration(case):
    nodes, links = CASES[case]
    problem = prepare(make_inputs(nodes, links))
    best = exhaustive_placement(
        problem.inputs.cluster, problem.hardware, problem.options, problem.traffic, "goodput"
    ).rate_rps
    target = 0.6 * best
    milp = solve_placement(
        problem.inputs.cluster,
        problem.hardware,
        prune_dominated(problem.options),
        problem.traffic,
        "cost",
        target,
        EXACT,
    )
    brute = exhaustive_placement(
        problem.inputs.cluster, problem.hardware, problem.options, problem.traffic, "cost", target
    )
    assert milp.solver.objective == pytest.approx(brute.solver.objective, rel=1e-6)
    # The MILP's instances really serve the target (checked by max-flow, not the MILP).
    options = prune_dominated(problem.options)
    assert served_rate(milp.counts, options, problem.traffic)[0] >= target * (1 - 1e-6)


def test_slow_links_keep_pairs_inside_nodes():
    problem = prepare(make_inputs(SLOW))
    assert all(rate == 0 for rate in problem.traffic.nic_rps.values())  # 0.5 GB/s: too slow for TPOT
    placement, _ = place(problem, EXACT)
    assert placement.routes and all(p == d for p, d in placement.routes)
    fast = place(prepare(make_inputs(MIXED)), EXACT)[0]
    assert any(p != d for p, d in fast.routes)
    assert fast.rate_rps > placement.rate_rps


def test_milp_beats_or_ties_the_distserve_baseline():
    problem = prepare(make_inputs(SPLITWISE + [{"name": "l4", "gpu_type": "L4", "num_gpus": 4}]))
    placement, options = place(problem, EXACT)
    baseline = distserve_placement(problem.inputs.cluster, problem.hardware, problem.options, problem.traffic)
    assert baseline.rate_rps > 0
    assert placement.rate_rps >= baseline.rate_rps * (1 - 1e-6)
    # Only the MILP pairs one GPU type's prefill with another's decode.
    assert all(p == d for p, d in baseline.routes)


def test_model_that_fits_nowhere_names_the_smallest_fit():
    nodes = [{"name": "l4", "gpu_type": "L4", "num_gpus": 2}, {"name": "t4", "gpu_type": "T4", "num_gpus": 4}]
    with pytest.raises(ValueError) as err:
        prepare(make_inputs(nodes, model="llama-2-70b"))
    message = str(err.value)
    assert "model llama-2-70b" in message and "fits no instance" in message
    assert "L4: needs tp=8 pp=1 (8 GPUs in one node); its nodes have 2" in message
    assert "--layer-split" in message


def test_unreachable_slo_reports_the_best_attainable():
    tight = SLOSpec(ttft_s=0.01, tpot_s=0.1)
    with pytest.raises(ValueError) as err:
        prepare(make_inputs(MIXED, slo=tight))
    message = str(err.value)
    assert message.startswith("SLO unreachable: no prefill instance meets")
    assert "Best attainable on this cluster: P90 TTFT" in message and "A100-80GB tp=2" in message


def test_unreachable_cost_target_reports_the_goodput():
    problem = prepare(make_inputs(MIXED, objective="cost", target_rps=1000.0))
    with pytest.raises(
        ValueError,
        match=r"target rate 1000 req/s is out of reach: the most this cluster "
        r"serves within .* is \d+\.\d\d req/s",
    ):
        place(problem, EXACT)


def test_symmetric_nodes_solve_to_the_same_optimum():
    nodes = [{"name": "a", "count": 3, "gpu_type": "A100-80GB", "num_gpus": 2}]
    problem = prepare(make_inputs(nodes, slo=SLO))
    milp = solve_placement(
        problem.inputs.cluster,
        problem.hardware,
        prune_dominated(problem.options),
        problem.traffic,
        "goodput",
        None,
        EXACT,
    )
    brute = exhaustive_placement(problem.inputs.cluster, problem.hardware, problem.options, problem.traffic, "goodput")
    assert milp.rate_rps == pytest.approx(brute.rate_rps, rel=1e-6)


def test_pipeline_only_fit_says_how_to_plan_it():
    """16 T4s hold llama-2-70b only as tp=8 x pp=2; tandem serve runs no pipeline stages."""
    nodes = [{"name": "t4", "gpu_type": "T4", "num_gpus": 16}]
    with pytest.raises(ValueError) as err:
        prepare(make_inputs(nodes, model="llama-2-70b", max_pp=1))
    message = str(err.value)
    assert "only with pipeline parallelism (e.g. T4 tp=8 pp=2)" in message and "--max-pp 2" in message
    relaxed = SLOSpec(ttft_s=5.0, tpot_s=0.5)
    options = prepare(make_inputs(nodes, model="llama-2-70b", slo=relaxed, max_pp=2)).options
    assert {(o.tp, o.pp) for o in options} == {(8, 2)}
    with pytest.raises(ValueError, match="max_pp must be one of"):
        make_inputs(nodes, max_pp=3)


def test_max_pp_limits_the_options():
    nodes = [{"name": "a100", "gpu_type": "A100-80GB", "num_gpus": 8}]
    assert {o.pp for o in prepare(make_inputs(nodes)).options} > {1}
    assert {o.pp for o in prepare(make_inputs(nodes, max_pp=1)).options} == {1}


def test_three_gpu_nodes_host_a_tp2_instance_each():
    # llama-2-13b's 26 GB of weights need two L4s: a 3-GPU node holds one such instance.
    nodes = [{"name": "l4", "count": 2, "gpu_type": "L4", "num_gpus": 3}]
    problem = prepare(make_inputs(nodes, model="llama-2-13b", slo=SLOSpec(ttft_s=2.0, tpot_s=0.2), max_pp=1))
    placement, options = place(problem, EXACT)
    assert placement.rate_rps > 0
    assert {(options[i].tp, options[i].pp) for (_, i) in placement.counts} == {(2, 1)}
    for node in ("l4-0", "l4-1"):
        assert sum(c * options[i].num_gpus for (n, i), c in placement.counts.items() if n == node) <= 3


def test_three_gpu_node_uses_its_third_gpu_for_a_tp1_instance():
    # llama-2-7b fits one L4; the MILP may pack tp=2 and tp=1 instances into 3 GPUs, and
    # finds what exhaustive enumeration over every packing finds.
    nodes = [{"name": "l4", "gpu_type": "L4", "num_gpus": 3}]
    problem = prepare(make_inputs(nodes, slo=SLOSpec(ttft_s=0.6, tpot_s=0.1)))
    placement, options = place(problem, EXACT)
    brute = exhaustive_placement(problem.inputs.cluster, problem.hardware, problem.options, problem.traffic, "goodput")
    assert placement.rate_rps == pytest.approx(brute.rate_rps, rel=1e-6)
    assert sorted(options[i].num_gpus for (_, i), c in placement.counts.items() for _ in range(c)) == [1, 2]


def test_a_node_too_small_for_both_roles_names_the_cause():
    nodes = [{"name": "l4", "gpu_type": "L4", "num_gpus": 3}]
    problem = prepare(make_inputs(nodes, model="llama-2-13b", slo=SLOSpec(ttft_s=2.0, tpot_s=0.2)))
    with pytest.raises(ValueError) as err:
        place(problem, EXACT)
    message = str(err.value)
    assert "nic_gb_s" not in message and "links" not in message
    assert "a prefill and a decode instance" in message
    assert "L4 instance of llama-2-13b needs 2 GPUs" in message and "node l4 has 3" in message

"""Layer-split mode: every node's traffic fits its own NIC; stages chain over the layers."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from planner.planning import chained_goodput, make_layer_plan
from planner.problem import read_inputs
from planner.solve.layer_split import solve_layer_split
from planner.solve.network import BANDWIDTH_UTILIZATION
from planner.solve.solver import SolveOptions
from proto.plan import LayerStage, Plan, PlanNode, layer_chains
from proto.slo import SLOSpec
from tests.deploy.helm_support import uniform_plan
from tests.planner.inputs import GENEROUS_TIME_LIMIT_S, make_inputs

OPTIONS = SolveOptions(time_limit_s=GENEROUS_TIME_LIMIT_S, gap_rel=1e-4)
SLO = SLOSpec(ttft_s=3.0, tpot_s=0.25)


def node_traffic_bytes(stage, inputs, stats) -> tuple[float, float]:
    """Bytes/s one node of the stage sends and receives: activations to and from the
    neighbouring stages, and the KV of its layers from prefill to decode."""
    model = inputs.model
    mean_in, mean_out = float(stats.input_tokens.mean()), float(stats.output_tokens.mean())
    activations = model.hidden_size * model.dtype_bytes * (mean_in if stage.role == "prefill" else mean_out)
    kv = model.kv_bytes_per_token / model.num_layers * (stage.layer_end - stage.layer_start) * mean_in
    sent = activations * (stage.layer_end < model.num_layers) + (kv if stage.role == "prefill" else 0.0)
    received = activations * (stage.layer_start > 0) + (kv if stage.role == "decode" else 0.0)
    return stage.rate_rps * sent, stage.rate_rps * received


@pytest.mark.parametrize("nic_gb_s", [1.0, 2.0])
def test_each_node_keeps_within_its_own_nic(nic_gb_s):
    # Slow NICs: a class's spare NICs must not carry another node's traffic.
    inputs = make_inputs(
        [
            {"name": "a", "count": 3, "gpu_type": "A100-40GB", "num_gpus": 4, "nic_gb_s": nic_gb_s},
            {"name": "l", "count": 2, "gpu_type": "L4", "num_gpus": 4, "nic_gb_s": nic_gb_s},
        ],
        model="llama-2-70b",
        slo=SLO,
    )
    hardware, _, stats, latency = read_inputs(inputs)
    split = solve_layer_split(inputs.cluster, hardware, inputs.model, latency, stats, SLO, 16, OPTIONS)
    assert split.solver.status == "optimal" and split.goodput_rps > 0
    limit = nic_gb_s * 1e9 * BANDWIDTH_UTILIZATION
    for stage in split.stages:
        sent, received = node_traffic_bytes(stage, inputs, stats)  # rates are rounded to 4 decimals
        assert sent <= limit * (1 + 1e-3), f"{stage.node} sends {sent / limit:.2f}x its NIC"
        assert received <= limit * (1 + 1e-3), f"{stage.node} receives {received / limit:.2f}x its NIC"


def stage(role, node, start, end, rate, tp=1):
    return LayerStage(role, node, "L4", tp, start, end, rate)


def test_chains_take_the_widest_first_and_leave_a_fan_out_idle():
    # Prefill: a feeds b and c (Helix's max-flow: 10 req/s); as node-disjoint chains a can
    # serve only one of them. Decode: two chains cut in different places.
    stages = (
        stage("prefill", "a", 0, 2, 10.0),
        stage("prefill", "b", 2, 5, 5.0),
        stage("prefill", "c", 2, 5, 6.0),
        stage("decode", "d", 0, 3, 4.0),
        stage("decode", "e", 3, 5, 4.0),
        stage("decode", "f", 0, 1, 7.0),
        stage("decode", "g", 1, 5, 8.0),
    )
    chains, idle = layer_chains(stages, 5)
    assert [(c.role, [s.node for s in c.stages], c.rate_rps, c.layers) for c in chains] == [
        ("prefill", ["a", "c"], 6.0, (2, 3)),
        ("decode", ["f", "g"], 7.0, (1, 4)),
        ("decode", ["d", "e"], 4.0, (3, 2)),
    ]
    assert [s.node for s in idle] == ["b"]
    served, warning = chained_goodput(stages, 5, 10.0)
    assert served == 6.0  # min(prefill 6, decode 11)
    assert (
        "3 chains carry 6.00 of the 10.00 req/s" in warning and "1 stage(s) join no chain and stay idle (b)" in warning
    )
    assert chained_goodput(stages[:2] + stages[3:5], 5, 4.0) == (4.0, None)


def test_a_chain_keeps_one_tp_and_a_role_without_one_is_refused():
    stages = (stage("prefill", "a", 0, 2, 5.0, tp=2), stage("prefill", "b", 2, 5, 5.0), stage("decode", "d", 0, 5, 5.0))
    chains, idle = layer_chains(stages, 5)
    assert [c.role for c in chains] == ["decode"] and {s.node for s in idle} == {"a", "b"}
    base = uniform_plan()
    nodes = tuple(PlanNode(s.node, "L4", 4, 1.0) for s in stages)
    plan = replace(base, groups=(), routes=(), stages=stages, nodes=nodes, model=replace(base.model, num_layers=5))
    with pytest.raises(
        ValueError, match=r"no prefill stages of one tp chain from layer 0 to layer 5 .*a \[0, 2\) tp=2"
    ):
        plan.check_servable()


def test_a_layer_split_plan_forecasts_what_its_chains_serve():
    inputs = make_inputs(
        [
            {"name": "a", "count": 3, "gpu_type": "A100-40GB", "num_gpus": 4, "nic_gb_s": 2.0},
            {"name": "l", "count": 2, "gpu_type": "L4", "num_gpus": 4, "nic_gb_s": 2.0},
        ],
        model="llama-2-70b",
        slo=SLO,
    )
    plan = make_layer_plan(inputs, OPTIONS)
    plan.check_servable()
    chains, _ = layer_chains(plan.stages, inputs.model.num_layers)
    served = min(sum(c.rate_rps for c in chains if c.role == role) for role in ("prefill", "decode"))
    assert plan.predicted.goodput_rps == pytest.approx(served, abs=1e-3)
    split_goodput = plan.solver.objective
    chained = [w for w in plan.warnings if "node-disjoint chains" in w]
    assert bool(chained) == (served < split_goodput - 1e-3)
    # The nodes the max-flow's chains leave idle are planned again into chains of their own.
    hardware, _, stats, latency = read_inputs(inputs)
    first = solve_layer_split(inputs.cluster, hardware, inputs.model, latency, stats, SLO, 16, OPTIONS)
    first_served, _ = chained_goodput(first.stages, inputs.model.num_layers, first.goodput_rps)
    _, first_idle = layer_chains(first.stages, inputs.model.num_layers)
    _, idle = layer_chains(plan.stages, inputs.model.num_layers)
    assert served >= first_served - 1e-3 and len(idle) <= len(first_idle)
    assert served <= split_goodput + 1e-3  # never more than the max-flow


def test_nodes_left_out_of_every_chain_are_planned_again(tmp_path, capsys):
    # helix-42: the max-flow has stages feeding several others; its chains alone leave 14
    # nodes idle and carry 87% of it. Planned again on their own, the idle nodes join chains.
    from deploy.cli import main

    examples = Path(__file__).resolve().parents[2] / "planner" / "examples"
    out = tmp_path / "split.yaml"
    argv = ["plan", "--cluster", str(examples / "cluster-helix-42.yaml"), "--model", "llama-2-70b", "--layer-split"]
    argv += ["--workload", str(examples / "workload.yaml"), "--slo", str(examples / "slo-relaxed.yaml")]
    assert main([*argv, "--gap", "0.01", "--out", str(out)]) == 0
    assert "planned again on their own" in capsys.readouterr().err
    plan = Plan.load(out)
    _, idle = layer_chains(plan.stages, plan.model.num_layers)
    (warning,) = [w for w in plan.warnings if "node-disjoint chains" in w]
    carried, max_flow = map(float, re.search(r"carry ([\d.]+) of the ([\d.]+) req/s", warning).groups())
    assert carried > 0.9 * max_flow and plan.predicted.goodput_rps == pytest.approx(carried, abs=0.01)
    assert len(idle) < 5


def test_flows_keep_one_tp_from_the_first_layer_to_the_last():
    # Nodes of 8 GPUs run their stages at tp 8, nodes of 4 at tp 4: a pipeline worker's
    # stages share one tp, so no request may pass from one to the other.
    inputs = make_inputs(
        [
            {"name": "a", "count": 2, "gpu_type": "A100-80GB", "num_gpus": 8, "nic_gb_s": 25.0},
            {"name": "l", "count": 3, "gpu_type": "L4", "num_gpus": 4, "nic_gb_s": 25.0},
        ],
        model="llama-2-70b",
        slo=SLO,
    )
    hardware, _, stats, latency = read_inputs(inputs)
    split = solve_layer_split(inputs.cluster, hardware, inputs.model, latency, stats, SLO, 16, OPTIONS)
    assert split.goodput_rps > 0 and len({s.tp for s in split.stages}) == 2
    for role in ("prefill", "decode"):
        for tp in {s.tp for s in split.stages if s.role == role}:
            stages = [s for s in split.stages if s.role == role and s.tp == tp]
            for j in {s.layer_end for s in stages} - {inputs.model.num_layers}:
                into = sum(s.rate_rps for s in stages if s.layer_end == j)
                out = sum(s.rate_rps for s in stages if s.layer_start == j)
                assert into == pytest.approx(out, abs=1e-3 * len(stages)), (role, tp, j)
    plan = make_layer_plan(inputs, OPTIONS)
    plan.check_servable()  # a chain for each role

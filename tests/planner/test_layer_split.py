"""Layer-split mode: every node's traffic fits its own NIC; stages chain over the layers."""

from __future__ import annotations

import pytest

from planner.problem import read_inputs
from planner.solve.layer_split import solve_layer_split
from planner.solve.network import BANDWIDTH_UTILIZATION
from planner.solve.solver import SolveOptions
from proto.slo import SLOSpec
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

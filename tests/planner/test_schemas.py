"""Input and plan schemas: valid files load, bad ones fail naming the field, plans round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.latency.gpus import GPU_TYPES
from planner.latency.models import ARCHITECTURES, resolve_model
from planner.simulate.workload import WorkloadSpec, load_trace
from proto.cluster import ClusterSpec
from proto.plan import (
    Calibration,
    InstanceGroup,
    LayerStage,
    Metrics,
    Plan,
    PlanNode,
    Route,
    SolverInfo,
    ray_resource_name,
)
from proto.slo import SLOSpec

NODES = [
    {"name": "a", "gpu_type": "A100-80GB", "num_gpus": 8, "count": 2, "nic_gb_s": 25},
    {"name": "l4", "gpu_type": "L4", "num_gpus": 4, "cost_per_gpu_hour": 0.7},
]


def test_cluster_expands_counts_and_keeps_overrides():
    cluster = ClusterSpec.from_dict({"nodes": NODES, "links": [{"a": "a-0", "b": "l4", "gb_s": 1.0}]}, GPU_TYPES)
    assert [n.name for n in cluster.nodes] == ["a-0", "a-1", "l4"]
    assert cluster.num_gpus == 20
    assert cluster.node("l4").cost_per_gpu_hour == 0.7
    assert cluster.link_gb_s("l4", "a-0") == 1.0 and cluster.link_gb_s("a-0", "a-1") is None
    assert ClusterSpec.from_dict(cluster.to_dict(), GPU_TYPES) == cluster


@pytest.mark.parametrize(
    "change, field",
    [
        ({"gpu_type": "A100"}, "cluster.nodes[0].gpu_type"),
        ({"num_gpus": 0}, "num_gpus"),
        ({"num_gpus": "8"}, "num_gpus"),
        ({"nic_gb_s": -1}, "nic_gb_s"),
        ({"speed": 3}, "cluster.nodes[0].speed"),
    ],
)
def test_cluster_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ClusterSpec.from_dict({"nodes": [{**NODES[0], **change}]}, GPU_TYPES)


def test_cluster_unknown_gpu_lists_known_types():
    with pytest.raises(ValueError, match="H100.*T4"):
        ClusterSpec.from_dict({"nodes": [{**NODES[0], "gpu_type": "B200"}]}, GPU_TYPES)


def test_cluster_rejects_duplicates_and_dangling_links():
    with pytest.raises(ValueError, match="used twice"):
        ClusterSpec.from_dict({"nodes": [NODES[1], NODES[1]]})
    with pytest.raises(ValueError, match=r"cluster.links\[0\].b 'x' is not a node name"):
        ClusterSpec.from_dict({"nodes": NODES, "links": [{"a": "l4", "b": "x", "gb_s": 1}]})


def test_slo_validation():
    assert SLOSpec.from_dict({"ttft_s": 0.4, "tpot_s": 0.1}).attainment == 0.9
    with pytest.raises(ValueError, match="slo.ttft_percentile"):
        SLOSpec(ttft_s=0.4, tpot_s=0.1, ttft_percentile=100)
    with pytest.raises(ValueError, match="slo.tpot_s is required"):
        SLOSpec.from_dict({"ttft_s": 0.4})
    with pytest.raises(ValueError, match="slo.attainment"):
        SLOSpec(ttft_s=0.4, tpot_s=0.1, attainment=1.5)


def test_model_from_hf_config_directory(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = resolve_model(str(tmp_path))
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (4, 2, 32, "bfloat16")
    assert spec.path == str(tmp_path.resolve())
    assert spec.kv_bytes_per_token == 2 * 4 * 2 * 32 * 2


def test_model_named_and_errors(write_yaml):
    spec = resolve_model("llama-2-70b", dtype="bfloat16")
    assert spec.num_kv_heads == 8 and spec.dtype == "bfloat16"
    assert 65e9 < spec.num_params < 72e9  # Llama-2-70B has 69B parameters
    assert resolve_model(write_yaml("m.yaml", {"name": "llama-2-7b", "path": "/m"})).path == "/m"
    with pytest.raises(ValueError, match="model.num_kv_heads"):
        resolve_model(write_yaml("bad.yaml", {**ARCHITECTURES["llama-2-7b"].to_dict(), "num_kv_heads": 5}))
    with pytest.raises(ValueError, match="neither a known architecture"):
        resolve_model("gpt-5")


def test_workload_distributions_and_errors(write_yaml):
    spec = WorkloadSpec.load(
        write_yaml(
            "w.yaml",
            {
                "rate_rps": 10,
                "input_tokens": {"distribution": "fixed", "value": 100},
                "output_tokens": {"distribution": "uniform", "min": 5, "max": 9},
            },
        )
    )
    reqs = spec.sample(5000, seed=1)
    assert (reqs.input_tokens == 100).all()
    assert reqs.output_tokens.min() == 5 and reqs.output_tokens.max() == 9
    assert abs(len(reqs) / reqs.arrival_s[-1] - 10) < 0.5  # Poisson at the given rate
    with pytest.raises(ValueError, match="workload.input_tokens.distribution must be one of"):
        WorkloadSpec.from_dict(
            {
                "rate_rps": 1,
                "input_tokens": {"distribution": "zipf"},
                "output_tokens": {"distribution": "fixed", "value": 1},
            }
        )
    with pytest.raises(ValueError, match="workload.output_tokens.max"):
        WorkloadSpec.from_dict(
            {
                "rate_rps": 1,
                "input_tokens": {"distribution": "fixed", "value": 1},
                "output_tokens": {"distribution": "uniform", "min": 5, "max": 2},
            }
        )
    with pytest.raises(ValueError, match="either trace, or rate_rps"):
        WorkloadSpec.from_dict({"rate_rps": 1})


def test_trace_replay_scales_to_the_rate(tmp_path):
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:00:{i:02d}.5000000,{100 + i},{i + 1}" for i in range(0, 60, 2)
    ]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    trace = load_trace(tmp_path / "t.csv")
    assert trace.rate_rps == pytest.approx(0.5)
    spec = WorkloadSpec.from_dict({"trace": "t.csv", "rate_rps": 2.0}, base_dir=tmp_path)
    reqs = spec.sample(40, trace=trace)
    assert np.diff(reqs.arrival_s[:30]) == pytest.approx(np.full(29, 0.5))  # 2 s gaps sped up 4x
    assert list(reqs.input_tokens[:3]) == [100, 102, 104] and reqs.input_tokens[30] == 100  # cycles


def _plan(**overrides) -> Plan:
    fields = dict(
        model=ARCHITECTURES["llama-2-7b"],
        slo=SLOSpec(ttft_s=0.4, tpot_s=0.1),
        objective="goodput",
        nodes=(PlanNode("a-0", "A100-80GB", 8, 3.7), PlanNode("l4", "L4", 4, 0.8)),
        groups=(
            InstanceGroup("prefill", "A100-80GB", 2, 1, 2, ("a-0", "a-0"), 16, 4096, 6.5),
            InstanceGroup("decode", "L4", 4, 1, 1, ("l4",), 40, 512, 2.5),
        ),
        routes=(Route("a-0", "l4", 2.5),),
        predicted=Metrics(2.5, 2.5, 0.91, 0.35, 0.08),
        simulated=Metrics(2.5, 3.1, 0.95, 0.3, 0.07),
        solver=SolverInfo("HiGHS", "optimal", 0.0, 0.2, 2.5, 10, 8),
    )
    return Plan(**{**fields, **overrides})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plan_round_trips(tmp_path, suffix):
    plan = _plan()
    plan.save(tmp_path / f"plan{suffix}")
    assert Plan.load(tmp_path / f"plan{suffix}") == plan
    assert plan.num_gpus == 8 and plan.gpus_by_type() == {"A100-80GB": 4, "L4": 4}
    assert plan.cost_per_hour == pytest.approx(4 * 3.7 + 4 * 0.8)
    assert plan.groups[0].ray_resource == ray_resource_name("A100-80GB") == "GPU_A100_80GB"


def test_plan_warnings_round_trip(tmp_path):
    plan = _plan(warnings=("forecast attainment 0.850 at 2.50 req/s is below the goal 0.900",))
    plan.save(tmp_path / "plan.yaml")
    assert Plan.load(tmp_path / "plan.yaml") == plan
    with pytest.raises(ValueError, match=r"plan.warnings\[0\] must be a non-empty string"):
        _plan(warnings=("",))


def test_plan_calibration_round_trips(tmp_path):
    plan = _plan(calibration=Calibration(rounds=1, prefill=1.21, decode=1.13))
    plan.save(tmp_path / "plan.yaml")
    assert Plan.load(tmp_path / "plan.yaml") == plan
    assert _plan().calibration is None  # a plan of the model's own capacities
    data = plan.to_dict()
    data["calibration"]["decode"] = 0
    with pytest.raises(ValueError, match="plan.calibration.decode must be > 0"):
        Plan.from_dict(data)


def test_layer_split_plan_round_trips(tmp_path):
    stages = (LayerStage("prefill", "a-0", "A100-80GB", 8, 0, 32, 1.0), LayerStage("decode", "l4", "L4", 4, 0, 32, 1.0))
    plan = _plan(groups=(), routes=(), stages=stages, simulated=None)
    plan.save(tmp_path / "plan.yaml")
    assert Plan.load(tmp_path / "plan.yaml") == plan


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"groups": (InstanceGroup("decode", "L4", 4, 1, 2, ("l4", "l4"), 40, 512, 2.5),)},
            "places 8 GPUs on node 'l4'",
        ),
        ({"groups": (InstanceGroup("decode", "H100", 1, 1, 1, ("l4",), 40, 512, 2.5),)}, "does not match node 'l4'"),
        ({"routes": (Route("a-0", "zz", 1.0),)}, "node 'zz'"),
        ({"objective": "latency"}, "plan.objective must be one of goodput, cost"),
        ({"groups": ()}, "places nothing"),
    ],
)
def test_plan_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        _plan(**overrides)


def test_plan_file_errors_name_the_field(tmp_path):
    data = _plan().to_dict()
    data["groups"][0]["role"] = "encode"
    with pytest.raises(ValueError, match="role must be one of prefill, decode"):
        Plan.from_dict(data)
    data = _plan().to_dict()
    del data["groups"][1]["tp"]
    with pytest.raises(ValueError, match=r"plan.groups\[1\].tp is required"):
        Plan.from_dict(data)
    with pytest.raises(ValueError, match=r"nodes must name one node per instance: 2 instances, 1 nodes"):
        InstanceGroup("decode", "L4", 4, 1, 2, ("l4",), 40, 512, 2.5)


@pytest.mark.parametrize("name, billions", [("opt-13b", 12.85), ("opt-66b", 65.7), ("opt-175b", 174.6)])
def test_opt_models_have_two_matrix_mlps(name, billions):
    spec = resolve_model(name)
    assert spec.mlp == "dense" and spec.tie_word_embeddings
    # The published counts include biases and learned positions (under 0.2% of the weights).
    assert spec.num_params / 1e9 == pytest.approx(billions, rel=0.003)
    assert ARCHITECTURES["llama-2-13b"].mlp == "gated"
    assert 12.9e9 < ARCHITECTURES["llama-2-13b"].num_params < 13.1e9  # three matrices: 13.0B


def test_model_mlp_kind_is_checked(write_yaml):
    spec = ARCHITECTURES["opt-13b"].to_dict()
    assert resolve_model(write_yaml("opt.yaml", spec)) == ARCHITECTURES["opt-13b"]
    with pytest.raises(ValueError, match="model.mlp must be one of gated, dense; got 'relu'"):
        resolve_model(write_yaml("bad.yaml", {**spec, "mlp": "relu"}))


def test_opt_config_json_reads_as_a_dense_mlp(tmp_path):
    config = {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": 5120,
        "ffn_dim": 20480,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 5120,
        "torch_dtype": "float16",
        "do_layer_norm_before": True,
        "activation_function": "relu",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = resolve_model(str(tmp_path))
    assert spec.mlp == "dense" and spec.intermediate_size == 20480 and spec.num_kv_heads == 40
    assert spec.num_params == ARCHITECTURES["opt-13b"].num_params


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"architectures": ["GPTNeoXForCausalLM"]},
            r"config.json architectures GPTNeoXForCausalLM is not one the "
            r"planner can size; known: LlamaForCausalLM, .*OPTForCausalLM",
        ),
        (
            {"architectures": ["MixtralForCausalLM"], "num_local_experts": 8},
            r"config.json num_local_experts: a mixture-of-experts model, which the planner cannot size",
        ),
        (
            {"architectures": ["LlamaForCausalLM"], "num_experts": 64},
            r"config.json num_experts: a mixture-of-experts model",
        ),
        (
            {"architectures": ["OPTForCausalLM"], "word_embed_proj_dim": 512},
            r"config.json word_embed_proj_dim \(512\) differs from hidden_size \(1024\)",
        ),
    ],
)
def test_config_json_the_planner_cannot_size_is_refused_by_name(tmp_path, config, message):
    base = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "ffn_dim": 4096,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
    with pytest.raises(ValueError, match=message):
        resolve_model(str(tmp_path))

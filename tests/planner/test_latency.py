"""Latency model: the roofline behaves like hardware does; profiles take precedence."""

from __future__ import annotations

import pytest

from planner.latency.gpus import GPU_SPECS, GPU_TYPES, NodeHardware, node_hardware
from planner.latency.models import ARCHITECTURES
from planner.latency.roofline import (
    ALLREDUCE_LATENCY_MS,
    COMPUTE_EFFICIENCY,
    LAYER_OVERHEAD_MS,
    LINK_EFFICIENCY,
    MEMORY_EFFICIENCY,
    STEP_OVERHEAD_MS,
    Coefficients,
    LatencyTable,
    Profile,
    ProfileEntry,
    allreduce_ms,
    gemm_ms,
    roofline,
    step_tokens_ms,
)
from proto.cluster import NodeSpec

MODEL = ARCHITECTURES["llama-2-13b"]


def hw(gpu: str) -> NodeHardware:
    return node_hardware(NodeSpec("n", gpu, 8))


def test_table_covers_the_required_gpus():
    for name in ("A100-40GB", "A100-80GB", "H100", "H200", "L4", "L40S", "A10G", "T4", "V100"):
        spec = GPU_SPECS[name]
        assert spec.peak_flops("float16") > 1e13 and spec.mem_bw_gb_s > 100 and spec.memory_gb >= 16
    assert set(GPU_TYPES) == set(GPU_SPECS)


def test_roofline_scales_like_hardware():
    a100 = roofline(MODEL, hw("A100-80GB"), 1, 1)
    # Long prompts are compute-bound: per token, the layers' 2 x params FLOPs at the GEMMs' efficiency.
    compute_ms = 2 * MODEL.num_layers * MODEL.params_per_layer / (312e12 * COMPUTE_EFFICIENCY) * 1e3
    assert 0.95 * compute_ms < a100.b < 1.15 * compute_ms
    # A decode step reads all weights (26 GB at the achievable share of 2 TB/s) and pays the fixed
    # costs; the line is exact for one sequence.
    weights_ms = MODEL.weight_bytes / (2039e9 * MEMORY_EFFICIENCY) * 1e3
    fixed_ms = STEP_OVERHEAD_MS + MODEL.num_layers * LAYER_OVERHEAD_MS
    assert a100.A + a100.C == pytest.approx(step_tokens_ms(MODEL, hw("A100-80GB"), 1, 1, 1, 1))
    assert 0.97 * (weights_ms + fixed_ms) < a100.A + a100.C < 1.05 * (weights_ms + fixed_ms)
    assert (
        roofline(MODEL, hw("H100"), 1, 1).prefill_ms(1000)
        < a100.prefill_ms(1000)
        < roofline(MODEL, hw("T4"), 1, 1).prefill_ms(1000)
    )
    tp2 = roofline(MODEL, hw("A100-80GB"), 2, 1)
    assert 0.5 < tp2.prefill_ms(2000) / a100.prefill_ms(2000) < 0.65  # halved compute, plus all-reduces
    # Small decode steps shrink far less than the weights per GPU: fixed costs and all-reduce
    # latencies (two per layer) stay.
    tp8 = roofline(MODEL, hw("A100-80GB"), 8, 1)
    assert tp8.A > a100.A / 4 > weights_ms / 4
    assert tp8.A > fixed_ms + 2 * MODEL.num_layers * ALLREDUCE_LATENCY_MS[True]
    # Over PCIe the same all-reduces cost more than over NVLink.
    l40s = roofline(MODEL, hw("L40S"), 4, 1)
    assert l40s.b - roofline(MODEL, hw("L40S"), 1, 1).b / 4 > tp2.b - a100.b / 2


def test_pipeline_stages_cost_their_bubble_as_the_engine_runs_them():
    gpu = hw("A100-80GB")
    pp1, pp2 = (lambda tokens, seqs, pp=pp: step_tokens_ms(MODEL, gpu, 1, pp, tokens, seqs) for pp in (1, 2))
    # One prompt is one micro-batch: it crosses both stages in turn, no faster than one GPU
    # running every layer (plus a send and a second stage's fixed cost).
    assert pp2(2048, 1) > pp1(2048, 1)
    # A batch of sequences is cut in two: the second half enters stage 0 while the first is in
    # stage 1, so a compute-bound step takes about (m + pp - 1) / (m pp) = 3/4 of one GPU's...
    assert 0.7 < pp2(8192, 64) / pp1(8192, 64) < 0.85
    # ...while a memory-bound decode step reads each stage's weights once per micro-batch:
    # about 3/2 of one GPU's. Stages buy memory, not speed, there.
    assert 1.35 < pp2(64, 64) / pp1(64, 64) < 1.6
    # The forecast's coefficients are these steps.
    assert roofline(MODEL, gpu, 1, 2).decode_ms(64, 0) > roofline(MODEL, gpu, 1, 1).decode_ms(64, 0)


def test_a_gemm_streams_weights_when_small_and_computes_when_large():
    gpu = GPU_SPECS["H100"]
    weights_ms = 2 * 8192 * 8192 / (3350e9 * MEMORY_EFFICIENCY) * 1e3
    assert gemm_ms(gpu, "bfloat16", 1, 8192, 8192) == pytest.approx(weights_ms, rel=0.01)
    compute_ms = 2 * 16384 * 8192 * 8192 / (989e12 * COMPUTE_EFFICIENCY) * 1e3
    assert gemm_ms(gpu, "bfloat16", 16384, 8192, 8192) == pytest.approx(compute_ms, rel=0.01)
    # Near the ridge neither roof is reached: slower than either alone, faster than both in turn.
    ridge = 989e12 * COMPUTE_EFFICIENCY / (3350e9 * MEMORY_EFFICIENCY)
    t = gemm_ms(gpu, "bfloat16", ridge, 8192, 8192)
    assert weights_ms * 1.2 < t < weights_ms * 2


def test_an_allreduce_costs_a_latency_plus_the_rings_bytes():
    nvlink = hw("A100-80GB")
    assert allreduce_ms(nvlink, 1, 1e6) == 0
    ring = 2 * 3 / 4 * 1e6 / (300e9 * LINK_EFFICIENCY) * 1e3
    assert allreduce_ms(nvlink, 4, 1e6) == pytest.approx(ALLREDUCE_LATENCY_MS[True] + ring)
    assert allreduce_ms(hw("L4"), 4, 1e6) > allreduce_ms(nvlink, 4, 1e6)  # PCIe: slower and later


def test_step_ms_mixes_prefill_and_decode():
    c = Coefficients(a=5, b=0.1, c=0.001, A=8, B=0.01, C=0.2)
    assert c.prefill_ms(100) == pytest.approx(5 + 10 + 10)
    assert c.decode_ms(4, 1000) == pytest.approx(8 + 10 + 0.8)
    assert c.step_ms(100, 100 * 100, 4, 1000) == pytest.approx(8 + 10 + 10 + 10 + 0.8)


def test_profile_round_trip_and_precedence(tmp_path):
    measured = Coefficients(a=1, b=2, c=3, A=4, B=5, C=6, source="profile")
    profile = Profile("llama-2-13b", (ProfileEntry("A100-80GB", 2, 1, measured),))
    profile.save(tmp_path / "p.yaml")
    loaded = Profile.load(tmp_path / "p.yaml")
    assert loaded == profile
    table = LatencyTable(MODEL, loaded)
    assert table.coefficients(hw("A100-80GB"), 2, 1) == measured
    assert table.coefficients(hw("A100-80GB"), 1, 1).source == "roofline"
    with pytest.raises(ValueError, match="profile.model is 'llama-2-13b'"):
        LatencyTable(ARCHITECTURES["llama-2-7b"], loaded)


def test_profile_errors_name_the_field():
    entry = {"gpu_type": "L4", "prefill_ms": {"a": 1, "b": 2, "c": 3}, "decode_ms": {"A": 1, "B": 2}}
    with pytest.raises(ValueError, match=r"profile.entries\[0\].decode_ms.C is required"):
        Profile.from_dict({"model": "m", "entries": [entry]})
    entry["decode_ms"]["C"] = -1
    with pytest.raises(ValueError, match=r"profile.entries\[0\].decode_ms.C must be >= 0"):
        Profile.from_dict({"model": "m", "entries": [entry]})


def test_profile_entry_for_no_gpu_type_of_the_cluster_is_an_error():
    measured = Coefficients(a=1, b=2, c=3, A=4, B=5, C=6, source="profile")
    profile = Profile("llama-2-13b", (ProfileEntry("A100-80GB", 1, 1, measured), ProfileEntry("A100", 2, 1, measured)))
    with pytest.raises(
        ValueError,
        match=r"profile.entries\[1\].gpu_type 'A100' matches no node of the cluster; "
        r"its GPU types: A100-80GB, L4",
    ):
        LatencyTable(MODEL, profile, gpu_types=("A100-80GB", "L4", "A100-80GB"))
    assert LatencyTable(MODEL, profile, gpu_types=("A100", "A100-80GB")).profile is profile

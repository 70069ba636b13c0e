"""CPU cores as devices: a cluster's cpu nodes are planned from a one-core profile only."""

from __future__ import annotations

import pytest

from deploy.cli import main
from planner.latency.gpus import CPU_MEMORY_GB, GPU_SPECS, node_hardware
from planner.latency.roofline import Coefficients, Profile, ProfileEntry, roofline
from planner.planning import make_plan
from planner.problem import PlanInputs, prepare
from planner.simulate.workload import LengthDist, WorkloadSpec
from planner.solve.capacity import kv_capacity_tokens
from planner.solve.solver import SolveOptions
from proto.cluster import ClusterSpec, NodeSpec
from proto.model_spec import ModelSpec
from proto.plan import Plan
from proto.slo import SLOSpec
from tests.planner.inputs import GENEROUS_TIME_LIMIT_S

MODEL = ModelSpec(
    "tiny",
    num_layers=4,
    hidden_size=512,
    num_heads=8,
    num_kv_heads=4,
    intermediate_size=1024,
    vocab_size=384,
    dtype="float32",
)
ONE_CORE = Coefficients(a=5.0, b=0.05, c=1e-5, A=3.0, B=0.001, C=0.2, source="profile")
WORKLOAD = WorkloadSpec(
    rate_rps=1.0,
    input_tokens=LengthDist("uniform", min=20, max=200),
    output_tokens=LengthDist("uniform", min=10, max=60),
)
SLO = SLOSpec(ttft_s=0.5, tpot_s=0.05)
OPTIONS = SolveOptions(time_limit_s=GENEROUS_TIME_LIMIT_S)


def inputs(nodes: list[dict], entries: tuple[ProfileEntry, ...] | None) -> PlanInputs:
    return PlanInputs(
        cluster=ClusterSpec.from_dict({"nodes": nodes}),
        model=MODEL,
        workload=WORKLOAD,
        slo=SLO,
        profile=None if entries is None else Profile("tiny", entries),
        max_pp=1,
    )


def test_a_cpu_node_without_a_profile_entry_names_the_fix():
    nodes = [{"name": "box", "gpu_type": "cpu", "num_gpus": 2}]
    with pytest.raises(
        ValueError,
        match=r"cluster.nodes\[0\] \(box\) has gpu_type cpu.*"
        r"tandem profile --device cpu --cores 1",
    ):
        prepare(inputs(nodes, None))
    # The roofline itself refuses the device by the same fix.
    with pytest.raises(ValueError, match="tandem profile --device cpu --cores 1"):
        roofline(MODEL, node_hardware(NodeSpec("box", "cpu", 2)), 1, 1)
    assert not GPU_SPECS["cpu"].has_roofline and GPU_SPECS["A100-80GB"].has_roofline


def test_cpu_cores_are_devices_planned_at_the_profiles_tp():
    nodes = [{"name": "box", "count": 2, "gpu_type": "cpu", "num_gpus": 2}]
    problem = prepare(inputs(nodes, (ProfileEntry("cpu", 1, 1, ONE_CORE),)))
    assert {(o.tp, o.pp) for o in problem.options} == {(1, 1)}  # two cores, yet only the profiled tp
    assert all(o.coefficients == ONE_CORE for o in problem.options)
    plan = make_plan(
        inputs(nodes, (ProfileEntry("cpu", 1, 1, ONE_CORE),)), OPTIONS, num_sim_requests=300, search_goodput=False
    )
    assert {g.gpu_type for g in plan.groups} == {"cpu"} and {g.tp for g in plan.groups} == {1}
    assert {g.latency_source for g in plan.groups} == {"profile"}
    assert plan.num_gpus <= 4 and plan.predicted.goodput_rps > 0 and plan.simulated is not None
    assert Plan.from_dict(plan.to_dict()) == plan
    # A profile entry for tp=2 (measured with two ranks of one core each) opens tp=2.
    two = Coefficients(a=3.0, b=0.026, c=6e-6, A=2.0, B=0.0006, C=0.11, source="profile")
    problem = prepare(inputs(nodes, (ProfileEntry("cpu", 1, 1, ONE_CORE), ProfileEntry("cpu", 2, 1, two))))
    assert {o.tp for o in problem.options} == {1, 2}


def test_cpu_memory_per_core_comes_from_the_node_or_the_default():
    default = node_hardware(NodeSpec("box", "cpu", 2))
    bigger = node_hardware(NodeSpec("box", "cpu", 2, gpu_memory_gb=8.0))
    assert default.memory_bytes == CPU_MEMORY_GB * 1e9 and bigger.memory_bytes == 8e9
    assert kv_capacity_tokens(MODEL, bigger, 1, 1) > 3 * kv_capacity_tokens(MODEL, default, 1, 1) > 0


def test_cpu_and_gpu_nodes_plan_together():
    nodes = [{"name": "box", "gpu_type": "cpu", "num_gpus": 2}, {"name": "l4", "gpu_type": "L4", "num_gpus": 1}]
    problem = prepare(inputs(nodes, (ProfileEntry("cpu", 1, 1, ONE_CORE),)))
    sources = {(o.gpu_type, o.coefficients.source) for o in problem.options}
    assert sources == {("cpu", "profile"), ("L4", "roofline")}


@pytest.fixture
def one_core_profile(tmp_path, monkeypatch):
    """`tandem profile --device cpu --cores 1` with step times made up (the engine's real
    steps run, the clock does not matter); records the cores the process computed on."""
    from engine.cores import process_cores
    from planner.latency import profile as profile_module
    from tests.checkpoints import make_checkpoint

    seen = []

    def fake_timed_step(engine):
        seen.append(process_cores())
        out = engine.schedule()
        engine.run(out)
        return 1.0 + 0.01 * out.num_batched_tokens + 0.1 * len(out.scheduled), out

    monkeypatch.setattr(profile_module, "_timed_step", fake_timed_step)
    return make_checkpoint(tmp_path / "tiny", "llama"), seen


def test_profile_on_one_core_files_a_cpu_entry(one_core_profile, tmp_path, capsys):
    from engine.cores import process_cores

    model, seen = one_core_profile
    before = process_cores()
    out = tmp_path / "profile.yaml"
    assert (
        main(
            [
                "profile",
                "--model",
                str(model),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--cores",
                "1",
                "--repeats",
                "1",
                "--prefill-tokens",
                "16,32,64",
                "--decode-batches",
                "1,2",
                "--decode-contexts",
                "32",
            ]
        )
        == 0
    )
    (entry,) = Profile.load(out).entries
    assert (entry.gpu_type, entry.tp, entry.pp) == ("cpu", 1, 1)
    assert seen and all(len(cores) == 1 and threads == 1 for cores, threads in seen)
    assert process_cores() == before  # the process gets its cores and threads back
    assert "computing on cores" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cpu", "--cores", "2"], "gpu_type cpu is one core"),
        (["--device", "cpu", "--cores", "0"], "--cores must be >= 1"),
        (["--device", "cpu", "--cores", "4096", "--gpu-type", "cpu-4096"], "this process may run on"),
    ],
)
def test_profile_cores_errors(one_core_profile, tmp_path, capsys, extra, message):
    model, _ = one_core_profile
    assert main(["profile", "--model", str(model), "--out", str(tmp_path / "p.yaml"), *extra]) == 2
    assert message in capsys.readouterr().err

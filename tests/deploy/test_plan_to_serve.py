"""`tandem plan` for a heterogeneous cluster, then `tandem serve --plan` on Ray with fake GPUs."""

import asyncio

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is not installed")

from deploy.cli import build_parser, main  # noqa: E402
from deploy.commands import start_backend  # noqa: E402
from engine import SamplingParams  # noqa: E402
from proto.plan import Plan, ray_resource_name  # noqa: E402
from tests.checkpoints import hf_greedy  # noqa: E402
from tests.workers.test_ray_serving import collect, tokens  # noqa: E402

CLUSTER = {
    "nodes": [
        {"name": "a100", "gpu_type": "A100-80GB", "num_gpus": 2, "nic_gb_s": 25},
        {"name": "l4", "gpu_type": "L4", "num_gpus": 2, "nic_gb_s": 10},
    ]
}
WORKLOAD = {
    "rate_rps": 2.0,
    "input_tokens": {"distribution": "uniform", "min": 16, "max": 200},
    "output_tokens": {"distribution": "uniform", "min": 8, "max": 64},
}
SLO = {"ttft_s": 0.5, "tpot_s": 0.1, "ttft_percentile": 90, "tpot_percentile": 90, "attainment": 0.9}


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def start_ray_with_fake_gpus(fake: dict[str, float]) -> None:
    """A local Ray whose GPUs (and GPU-type resources) are fake: the workers reserve them but
    run on the CPU."""
    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=int(sum(fake.values())),
        resources=fake,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}},
    )


def test_a_plan_for_mixed_gpus_starts_and_serves(tmp_path, tiny_llama_dir):
    plan_file = tmp_path / "plan.yaml"
    assert (
        main(
            [
                "plan",
                "--model",
                str(tiny_llama_dir),
                "--cluster",
                write(tmp_path / "c.yaml", CLUSTER),
                "--workload",
                write(tmp_path / "w.yaml", WORKLOAD),
                "--slo",
                write(tmp_path / "s.yaml", SLO),
                "--sim-requests",
                "200",
                "--no-goodput-search",
                "--time-limit",
                "20",
                "--out",
                str(plan_file),
            ]
        )
        == 0
    )
    plan = Plan.load(plan_file)
    assert plan.num_instances("prefill") >= 1 and plan.num_instances("decode") >= 1
    assert plan.model.path == str(tiny_llama_dir.resolve())

    # Fake GPUs: the workers reserve them (and their GPU-type resources) but run on the CPU.
    fake = {ray_resource_name(n["gpu_type"]): n["num_gpus"] for n in CLUSTER["nodes"]}
    start_ray_with_fake_gpus(fake)
    args = build_parser().parse_args(
        [
            "serve",
            "--plan",
            str(plan_file),
            "--model-name",
            "planned",
            "--kv-backend",
            "shm",
            "--local-prefill-tokens",
            "0",
        ]
    )
    try:
        backend, stop = start_backend(args, log=lambda _: None)
        try:
            used = {k: v for k, v in ray.available_resources().items() if k.startswith("GPU_")}
            for name, total in fake.items():  # every planned instance holds GPUs of its type
                planned = sum(g.count * g.tp * g.pp for g in plan.groups if ray_resource_name(g.gpu_type) == name)
                assert total - used.get(name, 0) == planned
            prompt = list(range(5, 45))

            deltas = asyncio.run(collect(backend, "r", prompt, SamplingParams(temperature=0.0, max_tokens=8)))
            assert tokens(deltas) == hf_greedy(tiny_llama_dir, prompt, 8)
        finally:
            stop()
    finally:
        ray.shutdown()


def test_plans_serve_cannot_run_are_refused_before_anything_starts(tmp_path, capsys):
    """Pipeline stages are served, and layer-split stages as chains; a layer split with no
    chain for a role (stages that do not tile the layers with one tp) is refused by name."""
    from dataclasses import replace

    from proto.plan import LayerStage
    from tests.deploy.helm_support import uniform_plan

    plan = uniform_plan()
    replace(plan, groups=(replace(plan.groups[0], tp=4, pp=2),) + plan.groups[1:]).check_servable()
    split = replace(plan, groups=(), routes=(), stages=(LayerStage("prefill", "h100-0", "H100", 8, 0, 32, 1.0),))
    for bad, message in ((split, "no decode stages of one tp chain from layer 0 to layer 32"),):
        path = tmp_path / "bad.yaml"
        bad.save(path)
        for command in (["serve", "--plan", str(path)], ["deploy", "helm-values", "--plan", str(path)]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert message in err, err
    assert not ray.is_initialized()


def test_a_layer_split_plan_serves_its_chains_token_exact(tmp_path, capsys):
    """A Helix-style plan over fake A100 and L4 nodes, ranges uneven and cut differently for
    prefill (1 | 4 layers) and decode (3 | 2): each chain starts as a pipeline worker with a
    stage on each node's GPU type, the stage left out of every chain holds nothing, and the
    tokens equal transformers'."""
    from dataclasses import replace

    from planner.latency.models import ARCHITECTURES
    from proto.plan import LayerStage, Metrics, PlanNode, SolverInfo
    from proto.slo import SLOSpec
    from tests.checkpoints import make_checkpoint, make_tokenizer

    model_dir = make_checkpoint(
        tmp_path / "llama5", "llama", make_tokenizer(tmp_path / "tok"), seed=6, num_hidden_layers=5
    )
    stages = (
        LayerStage("prefill", "a100-0", "A100-80GB", 1, 0, 1, 3.0),
        LayerStage("prefill", "l4-0", "L4", 1, 1, 5, 3.0),
        LayerStage("prefill", "l4-1", "L4", 1, 1, 5, 2.0),  # a fan-out from a100-0: in no chain
        LayerStage("decode", "l4-2", "L4", 1, 0, 3, 3.0),
        LayerStage("decode", "a100-1", "A100-80GB", 1, 3, 5, 3.0),
    )
    plan = Plan(
        model=replace(ARCHITECTURES["llama-2-7b"], num_layers=5, path=str(model_dir)),
        slo=SLOSpec(ttft_s=1.0, tpot_s=0.2),
        objective="goodput",
        nodes=tuple(PlanNode(s.node, s.gpu_type, 1) for s in stages),
        groups=(),
        routes=(),
        stages=stages,
        predicted=Metrics(3.0, 3.0, 0.9, 1.0, 0.2),
        solver=SolverInfo("HiGHS", "optimal", 0.0, 0.1, 5.0),
    )
    plan_file = tmp_path / "split.yaml"
    plan.save(plan_file)
    assert main(["deploy", "helm-values", "--plan", str(plan_file), "--out", str(tmp_path / "values.yaml")]) == 0
    fake = {ray_resource_name("A100-80GB"): 2, ray_resource_name("L4"): 3}
    start_ray_with_fake_gpus(fake)
    args = build_parser().parse_args(
        ["serve", "--plan", str(plan_file), "--kv-backend", "shm", "--local-prefill-tokens", "0"]
    )
    try:
        logged = []
        backend, stop = start_backend(args, log=logged.append)
        try:
            assert any("1 prefill x tp=1 pp=2 layers 1|4 on A100-80GB -> L4" in line for line in logged), logged
            assert any("1 decode x tp=1 pp=2 layers 3|2 on L4 -> A100-80GB" in line for line in logged), logged
            free = ray.available_resources()
            assert free.get(ray_resource_name("A100-80GB"), 0) == 0  # a100-0 and a100-1 hold a stage each
            assert free.get(ray_resource_name("L4"), 0) == 1  # l4-1 is in no chain
            prompt = list(range(5, 45))

            deltas = asyncio.run(collect(backend, "r", prompt, SamplingParams(temperature=0.0, max_tokens=8)))
            assert tokens(deltas) == hf_greedy(model_dir, prompt, 8)
        finally:
            stop()
    finally:
        ray.shutdown()

"""`tandem plan` for a heterogeneous cluster, then `tandem serve --plan` on Ray with fake GPUs."""

import asyncio
import contextlib

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is not installed")

from deploy.cli import build_parser, main  # noqa: E402
from deploy.commands import start_backend  # noqa: E402
from engine import SamplingParams  # noqa: E402
from proto.plan import Plan, ray_resource_name  # noqa: E402
from proto.serving import GenerateRequest  # noqa: E402
from tests.checkpoints import hf_greedy  # noqa: E402

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
    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=4,
        resources=fake,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}},
    )
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

            async def one():
                tokens = []
                async with contextlib.aclosing(
                    backend.generate(GenerateRequest("r", prompt, SamplingParams(temperature=0.0, max_tokens=8)))
                ) as stream:
                    async for delta in stream:
                        tokens += delta.token_ids
                return tokens

            assert asyncio.run(one()) == hf_greedy(tiny_llama_dir, prompt, 8)
        finally:
            stop()
    finally:
        ray.shutdown()


def test_plans_serve_cannot_run_are_refused_before_anything_starts(tmp_path, capsys):
    """Layer-split stages are planned (what-if) but not served yet; pipeline stages are."""
    from dataclasses import replace

    from proto.plan import LayerStage
    from tests.deploy.helm_support import uniform_plan

    plan = uniform_plan()
    replace(plan, groups=(replace(plan.groups[0], tp=4, pp=2),) + plan.groups[1:]).check_servable()
    split = replace(plan, groups=(), stages=(LayerStage("prefill", "h100-0", "H100", 8, 0, 16, 1.0),))
    for bad, message in ((split, "this plan is layer-split"),):
        path = tmp_path / "bad.yaml"
        bad.save(path)
        for command in (["serve", "--plan", str(path)], ["deploy", "helm-values", "--plan", str(path)]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert message in err, err
    assert not ray.is_initialized()

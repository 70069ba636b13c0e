"""The local Ray cluster the worker tests deploy on, and what the fault tests share: one
prefill and two decode workers, a process id, a stream read to its end, and the check that
every stream is token-exact."""

from __future__ import annotations

import asyncio
import contextlib
import os

import ray

from engine import EngineConfig, SamplingParams
from proto.serving import GenerateRequest, TokenDelta
from tests.checkpoints import hf_greedy


def start_local_ray(num_cpus: int) -> None:
    """Ray on this machine with num_cpus logical CPUs (workers share the real cores), quiet,
    with the Triton interpreter for CPU kernels and no Hugging Face downloads."""
    ray.init(
        address="local",  # never a cluster some other run left behind
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}},
    )


def deploy_two_decoders(model_dir, max_restarts: int, pin_cores: bool | None = None, elastic: bool = False):
    """1 prefill + 2 decode workers on shared memory, every prompt prefilled on the prefill
    worker, Ray restarting a dead worker up to max_restarts times (pin_cores, elastic: deploy's)."""
    from deploy.cluster import WorkerGroup, deploy

    return deploy(
        model_dir,
        [WorkerGroup("prefill", 1), WorkerGroup("decode", 2)],
        EngineConfig(max_num_batched_tokens=64, num_blocks=256),
        kv_backend="shm",
        model_name="tiny",
        local_prefill_tokens=0,
        transfer_timeout_s=20.0,
        max_restarts=max_restarts,
        pin_cores=pin_cores,
        elastic=elastic,
    )


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def stream(
    backend, rid: str, prompt: list[int], params: SamplingParams, started: asyncio.Event | None = None
) -> list[TokenDelta]:
    """Every delta of one request; `started` is set at its first."""
    deltas = []
    async with contextlib.aclosing(backend.generate(GenerateRequest(rid, prompt, params))) as s:
        async for delta in s:
            deltas.append(delta)
            if started is not None:
                started.set()
    return deltas


def assert_exact(results: dict[str, list[TokenDelta]], prompts: dict[str, list[int]], model_dir, max_tokens: int):
    """Each stream: no error, and its tokens, joined, are transformers' greedy ones."""
    for rid, deltas in results.items():
        assert all(d.finish_reason != "error" for d in deltas), (rid, deltas[-1])
        shown = [(d.token_ids, d.num_prompt_tokens, d.finish_reason) for d in deltas[:4]]
        expected = hf_greedy(model_dir, prompts[rid], max_tokens, True)
        assert [t for d in deltas for t in d.token_ids] == expected, (rid, shown)
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"

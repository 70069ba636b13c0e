"""Prefill TP=2 -> decode TP=1 on a real local Ray cluster, through deploy() and the router."""

import asyncio
import contextlib

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from deploy.cluster import WorkerGroup, deploy  # noqa: E402
from engine import EngineConfig, SamplingParams  # noqa: E402
from tests.checkpoints import hf_greedy  # noqa: E402
from tests.workers.test_ray_serving import all_free  # noqa: E402


def test_prefill_tp2_decode_tp1_serves_transformers_tokens(tiny_llama_dir):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}})
    dep = None
    try:
        dep = deploy(tiny_llama_dir, [WorkerGroup("prefill", 1, tp=2), WorkerGroup("decode", 1)],
                     EngineConfig(dtype="float32", max_num_batched_tokens=32, num_blocks=64),
                     kv_backend="shm", model_name="tiny", local_prefill_tokens=0, transfer_timeout_s=10.0)
        assert len(dep.follower_actors) == 1
        backend = dep.backend
        params = SamplingParams(temperature=0.0, max_tokens=8)
        prompts = [list(range(5, 5 + n)) for n in (4, 33, 70)]

        async def main():
            async def one(i, prompt):
                tokens = []
                async with contextlib.aclosing(backend.generate(f"tp{i}", prompt, params)) as stream:
                    async for delta in stream:
                        assert delta.error is None, delta.error
                        tokens += delta.token_ids
                return tokens
            results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            assert await all_free(backend)
            return results

        for prompt, tokens in zip(prompts, asyncio.run(main())):
            assert tokens == hf_greedy(tiny_llama_dir, prompt, 8)
        assert backend.stats()["kv_transfers_total"] == len(prompts)
    finally:
        if dep is not None:
            dep.shutdown()
        ray.shutdown()

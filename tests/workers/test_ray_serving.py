"""The disaggregated path on a real local Ray cluster: oracle, concurrency, cancel, dead worker."""

import asyncio
import contextlib

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from deploy.cluster import WorkerGroup, deploy  # noqa: E402
from engine import EngineConfig, SamplingParams  # noqa: E402
from proto.serving import GenerateRequest  # noqa: E402
from tests.checkpoints import hf_greedy  # noqa: E402
from tests.workers.local_ray import start_local_ray  # noqa: E402


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir):
    start_local_ray(4)
    groups = [WorkerGroup("prefill", 1), WorkerGroup("decode", 2)]
    dep = deploy(
        tiny_llama_dir,
        groups,
        EngineConfig(max_num_batched_tokens=32, num_blocks=64),
        kv_backend="shm",
        model_name="tiny",
        local_prefill_tokens=8,
        transfer_timeout_s=5.0,
    )
    yield dep
    dep.shutdown()
    ray.shutdown()


async def collect(backend, rid, prompt, params):
    deltas = []
    async with contextlib.aclosing(backend.generate(GenerateRequest(rid, prompt, params))) as stream:
        async for delta in stream:
            deltas.append(delta)
    return deltas


def tokens(deltas):
    return [t for d in deltas for t in d.token_ids]


async def all_free(backend):
    for _ in range(100):
        await backend.refresh()
        s = backend.stats()
        if (
            s["decode_num_free_blocks"] == s["decode_num_blocks"]
            and s["prefill_num_free_blocks"] == s["prefill_num_blocks"]
        ):
            return True
        await asyncio.sleep(0.05)
    return False


def test_disaggregated_and_local_prefill_match_transformers(deployment, tiny_llama_dir):
    backend = deployment.backend
    params = SamplingParams(temperature=0.0, max_tokens=10)
    prompts = [list(range(5, 8)), list(range(5, 40)), list(range(9, 80))]  # the first is short: local

    async def main():
        results = await asyncio.gather(*(collect(backend, f"o{i}", p, params) for i, p in enumerate(prompts)))
        assert await all_free(backend)
        return results

    results = asyncio.run(main())
    for prompt, deltas in zip(prompts, results, strict=True):
        assert deltas[-1].finished and deltas[-1].finish_reason in ("stop", "length")
        assert tokens(deltas) == hf_greedy(tiny_llama_dir, prompt, 10)
    stats = backend.stats()
    assert stats["kv_transfers_total"] >= 2 and stats["local_prefills_total"] >= 1
    assert stats["kv_transfer_bytes_total"] > 0


def test_many_concurrent_streams_then_no_block_leaks(deployment, tiny_llama_dir):
    backend = deployment.backend
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompts = {f"m{i}": [10 + i % 5] * (12 + 3 * i) for i in range(12)}

    async def main():
        results = await asyncio.gather(*(collect(backend, r, p, params) for r, p in prompts.items()))
        assert await all_free(backend)
        return dict(zip(prompts, results, strict=True))

    results = asyncio.run(main())
    for rid, prompt in prompts.items():
        assert tokens(results[rid]) == hf_greedy(tiny_llama_dir, prompt, 6)


def test_cancelled_stream_frees_blocks_on_both_workers(deployment):
    backend = deployment.backend

    async def main():
        stream = backend.generate(
            GenerateRequest(
                "cancel-me", list(range(5, 60)), SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
            )
        )
        async for _ in stream:
            break
        await stream.aclose()
        assert await all_free(backend)

    asyncio.run(main())


def test_bad_prompt_is_a_value_error(deployment):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await collect(deployment.backend, "empty", [], SamplingParams())
        with pytest.raises(ValueError, match="context window"):
            await collect(deployment.backend, "long", [5] * 5000, SamplingParams())

    asyncio.run(main())


def test_a_dead_decode_worker_is_routed_around(deployment, tiny_llama_dir):
    backend = deployment.backend
    ray.kill(deployment.decode_actors[1])
    params = SamplingParams(temperature=0.0, max_tokens=5)

    async def main():
        await backend.refresh()  # the router notices the dead worker and stops picking it
        return [await collect(backend, f"after-{i}", list(range(5, 30 + i)), params) for i in range(3)]

    for i, deltas in enumerate(asyncio.run(main())):
        assert tokens(deltas) == hf_greedy(tiny_llama_dir, list(range(5, 30 + i)), 5)
    assert backend.is_ready() and [w.up for w in backend.workers()] == [True, True, False]

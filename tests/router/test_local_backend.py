"""The colocated backend: streaming, concurrency, cancellation, admission control."""

import asyncio
import contextlib

import pytest

from engine import EngineConfig, SamplingParams
from proto.errors import Overloaded
from proto.serving import GenerateRequest
from router.local_backend import LocalBackend
from tests.checkpoints import hf_greedy


@pytest.fixture
def backend(tiny_llama_dir):
    b = LocalBackend(tiny_llama_dir, EngineConfig(max_num_batched_tokens=32), max_waiting=8)
    yield b
    b.close()


async def collect(backend, rid, prompt, params):
    deltas = []
    async with contextlib.aclosing(backend.generate(GenerateRequest(rid, prompt, params))) as stream:
        async for d in stream:
            deltas.append(d)
    return deltas


def test_concurrent_streams_match_transformers(backend, tiny_llama_dir):
    prompts = [[5 + i, 6, 7, 8 + i] * (i + 1) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=10)

    async def main():
        return await asyncio.gather(*(collect(backend, f"r{i}", p, params) for i, p in enumerate(prompts)))

    for prompt, deltas in zip(prompts, asyncio.run(main()), strict=True):
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == hf_greedy(tiny_llama_dir, prompt, 10)
    assert backend.stats()["num_free_blocks"] == backend.stats()["num_blocks"]


def test_closing_the_stream_aborts_and_frees_blocks(backend):
    async def main():
        stream = backend.generate(
            GenerateRequest(
                "long", list(range(3, 60)), SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
            )
        )
        async for delta in stream:
            if len(delta.token_ids):
                break
        await stream.aclose()

    asyncio.run(main())
    stats = backend.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_bad_input_and_overload_fail_before_streaming(backend):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await collect(backend, "empty", [], SamplingParams())
        # Fill the waiting queue without letting the engine thread drain it.
        with backend._loop._lock:
            for i in range(8):
                backend._loop.engine.add_request(f"w{i}", [5, 6], SamplingParams(max_tokens=1))
        with pytest.raises(Overloaded, match="max_waiting=8"):
            await collect(backend, "one-too-many", [5, 6], SamplingParams())

    asyncio.run(main())

"""Workers die, requests do not: kill -9 of a decode worker with streams in flight, on a real
local Ray cluster. Every stream goes on (resumed on the other decode worker after the tokens it
had), token-exact, with no error, gap or repeat; Ray restarts the dead worker, which rejoins."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from deploy.cluster import WorkerGroup, deploy  # noqa: E402
from engine import EngineConfig, SamplingParams  # noqa: E402
from proto.serving import GenerateRequest  # noqa: E402
from tests.checkpoints import hf_greedy  # noqa: E402
from tests.workers.local_ray import start_local_ray  # noqa: E402

NUM_STREAMS = 12
MAX_TOKENS = 120  # long enough that every stream is mid-way when the worker dies
RESTART_S = 180.0  # a restarted worker loads the model again: generous for a loaded machine


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir):
    start_local_ray(4)
    dep = deploy(
        tiny_llama_dir,
        [WorkerGroup("prefill", 1), WorkerGroup("decode", 2)],
        EngineConfig(max_num_batched_tokens=64, num_blocks=256),
        kv_backend="shm",
        model_name="tiny",
        local_prefill_tokens=0,
        transfer_timeout_s=20.0,
        max_restarts=1,
    )
    yield dep
    dep.shutdown()
    ray.shutdown()


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)


def test_kill_9_of_a_decode_worker_mid_stream_loses_no_request(deployment, tiny_llama_dir):
    backend = deployment.backend
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = {f"s{i}": list(range(5 + i, 40 + 2 * i)) for i in range(NUM_STREAMS)}
    victim = deployment.decode_actors[0]
    victim_pid = pid_of(victim)

    async def main():
        started = {rid: asyncio.Event() for rid in prompts}

        async def stream(rid, prompt):
            deltas = []
            async with contextlib.aclosing(backend.generate(GenerateRequest(rid, prompt, params))) as s:
                async for delta in s:
                    deltas.append(delta)
                    started[rid].set()
            return deltas

        tasks = [asyncio.create_task(stream(rid, p)) for rid, p in prompts.items()]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 120)
        running = sum(1 for t in tasks if not t.done())
        os.kill(victim_pid, signal.SIGKILL)
        return running, await asyncio.gather(*tasks)

    running, results = asyncio.run(main())
    assert running == NUM_STREAMS, "every stream was mid-way when the worker died"
    for (rid, prompt), deltas in zip(prompts.items(), results, strict=True):
        assert all(d.finish_reason != "error" for d in deltas), (rid, deltas[-1])
        assert [t for d in deltas for t in d.token_ids] == hf_greedy(tiny_llama_dir, prompt, MAX_TOKENS, True), rid
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    # Some streams were on the dead worker (the load policy spreads them) and were resumed.
    assert backend.counters["recoveries_total"] >= 1
    assert backend.counters["recovery_failures_total"] == 0

    # Ray restarts the worker; it rejoins routing, its blocks all free.
    async def rejoined():
        deadline = time.monotonic() + RESTART_S
        while True:
            await backend.refresh()
            if all(w.up for w in backend.workers()):
                return backend.stats()
            assert time.monotonic() < deadline, [(w.role, w.index, w.up) for w in backend.workers()]
            await asyncio.sleep(0.5)

    stats = asyncio.run(rejoined())
    assert pid_of(victim) != victim_pid
    assert stats["decode_num_free_blocks"] == stats["decode_num_blocks"]
    assert stats["decode_num_running"] == stats["decode_num_reserved"] == 0


def test_with_no_decode_worker_left_a_stream_ends_with_a_clear_error_after_its_wait(deployment, tiny_llama_dir):
    """Runs last: it kills both decode workers for good. A stream that cannot be resumed waits
    recovery_wait_s for a decode worker, then ends with one retryable error; the tokens it
    had are the right ones, and nothing hangs."""
    backend = deployment.backend
    backend.recovery_wait_s = 2.0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompt = list(range(7, 50))

    async def main():
        deltas = []
        async with contextlib.aclosing(backend.generate(GenerateRequest("orphan", prompt, params))) as stream:
            async for delta in stream:
                deltas.append(delta)
                if len(deltas) == 3:
                    for actor in deployment.decode_actors:
                        ray.kill(actor, no_restart=True)
        return deltas

    started = time.monotonic()
    deltas = asyncio.run(main())
    assert time.monotonic() - started < 60
    last = deltas[-1]
    assert last.finish_reason == "error" and last.retryable and "no decode worker is up" in last.error
    streamed = [t for d in deltas for t in d.token_ids]
    assert 3 <= len(streamed) < MAX_TOKENS
    assert streamed == hf_greedy(tiny_llama_dir, prompt, MAX_TOKENS, True)[: len(streamed)]
    assert not backend.is_ready()

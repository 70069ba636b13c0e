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

from proto.serving import GenerateRequest  # noqa: E402
from tests.checkpoints import hf_greedy  # noqa: E402
from tests.workers.local_ray import (  # noqa: E402
    assert_exact,
    deploy_two_decoders,
    greedy,
    pid_of,
    start_local_ray,
    stream,
)

NUM_STREAMS = 12
MAX_TOKENS = 120  # long enough that every stream is mid-way when the worker dies
RESTART_S = 180.0  # a restarted worker loads the model again: generous for a loaded machine


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir):
    start_local_ray(4)
    dep = deploy_two_decoders(tiny_llama_dir, max_restarts=1)
    yield dep
    dep.shutdown()
    ray.shutdown()


def test_kill_9_of_a_decode_worker_mid_stream_loses_no_request(deployment, tiny_llama_dir):
    backend = deployment.backend
    prompts = {f"s{i}": list(range(5 + i, 40 + 2 * i)) for i in range(NUM_STREAMS)}
    victim = deployment.decode_actors[0]
    victim_pid = pid_of(victim)

    async def main():
        started = {rid: asyncio.Event() for rid in prompts}
        tasks = [
            asyncio.create_task(stream(backend, rid, p, greedy(MAX_TOKENS), started[rid])) for rid, p in prompts.items()
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 120)
        running = sum(1 for t in tasks if not t.done())
        os.kill(victim_pid, signal.SIGKILL)
        return running, dict(zip(prompts, await asyncio.gather(*tasks), strict=True))

    running, results = asyncio.run(main())
    assert running == NUM_STREAMS, "every stream was mid-way when the worker died"
    assert_exact(results, prompts, tiny_llama_dir, MAX_TOKENS)
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
    prompt = list(range(7, 50))

    async def main():
        deltas = []
        request = GenerateRequest("orphan", prompt, greedy(MAX_TOKENS))
        async with contextlib.aclosing(backend.generate(request)) as deltas_in:
            async for delta in deltas_in:
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

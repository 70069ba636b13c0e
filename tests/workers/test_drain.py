"""Draining and rolling restarts lose no request, on a real local Ray cluster.

drain(decode worker) mid-stream moves every stream on it to the other decode worker (live
migration: its KV copied over, the stream going on from its next token); a rolling restart
drains, restarts and re-admits every worker in turn while requests keep coming. Every stream
ends token-exact, with no error, gap or repeat, and every block is free afterwards."""

from __future__ import annotations

import asyncio

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

import aiohttp  # noqa: E402

from router.security import Security  # noqa: E402
from router.server import serve  # noqa: E402
from tests.workers.local_ray import (  # noqa: E402
    assert_exact,
    deploy_two_decoders,
    greedy,
    pid_of,
    start_local_ray,
    stream,
)
from tests.workers.test_ray_serving import all_free  # noqa: E402

NUM_STREAMS = 10
MAX_TOKENS = 100  # long enough that every stream is mid-way when its worker drains
PARAMS = greedy(MAX_TOKENS)
KEY = "sk-admin-test"


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir):
    start_local_ray(4)
    dep = deploy_two_decoders(tiny_llama_dir, max_restarts=2)
    yield dep
    dep.shutdown()
    ray.shutdown()


def test_draining_a_decode_worker_mid_stream_moves_every_stream_off_it(deployment, tiny_llama_dir):
    backend = deployment.backend
    prompts = {f"d{i}": list(range(5 + i, 40 + 2 * i)) for i in range(NUM_STREAMS)}

    async def main():
        started = {rid: asyncio.Event() for rid in prompts}
        tasks = {rid: asyncio.create_task(stream(backend, rid, p, PARAMS, started[rid])) for rid, p in prompts.items()}
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 120)
        running = sum(not t.done() for t in tasks.values())
        moved = await backend.drain("decode", 0)
        await backend.refresh()
        on_drained = backend.workers()[1].stats  # prefill worker 0, then decode 0
        results = {rid: await t for rid, t in tasks.items()}
        backend.undrain("decode", 0)
        return running, moved, on_drained, results

    running, moved, on_drained, results = asyncio.run(main())
    assert running == NUM_STREAMS, "every stream was mid-way when the drain began"
    assert moved >= 1  # the load policy spread the streams over both decode workers
    assert on_drained is not None and on_drained.num_running == on_drained.num_reserved == 0
    assert_exact(results, prompts, tiny_llama_dir, MAX_TOKENS)
    # Every stream on it was decoding: each migrated with its KV (none had to be resumed).
    assert backend.counters["migrations_total"] == moved and backend.counters["moves_total"] == 0
    assert backend.counters["migration_failures_total"] == 0
    assert backend.counters["recoveries_total"] == backend.counters["recovery_failures_total"] == 0
    assert asyncio.run(all_free(backend))


def test_a_rolling_restart_of_every_worker_under_load_loses_no_request(deployment, tiny_llama_dir):
    backend = deployment.backend
    actors = [("prefill", 0, deployment.prefill_actors[0])] + [
        ("decode", i, a) for i, a in enumerate(deployment.decode_actors)
    ]
    pids = {(role, i): pid_of(a) for role, i, a in actors}
    prompts: dict[str, list[int]] = {}

    async def main():
        results: dict[str, list] = {}
        restarting = True

        async def load(k: int):  # a stream at a time per lane, for as long as the restart runs
            n = 0
            while restarting:
                rid = f"r{k}-{n}"
                prompts[rid] = list(range(5 + k + n % 7, 30 + 3 * k + n % 11))
                results[rid] = await stream(backend, rid, prompts[rid], PARAMS)
                n += 1

        lanes = [asyncio.create_task(load(k)) for k in range(4)]
        await asyncio.sleep(1.0)
        moved = [await deployment.restart_worker(role, i) for role, i, _ in actors]
        restarting = False
        await asyncio.gather(*lanes)
        return moved, results

    moved, results = asyncio.run(main())
    assert len(results) >= 8
    assert_exact(results, prompts, tiny_llama_dir, MAX_TOKENS)
    assert sum(moved[1:]) >= 1  # some streams were on each decode worker as it drained
    assert backend.counters["recovery_failures_total"] == 0
    assert all(pid_of(a) != pids[(role, i)] for role, i, a in actors), "every worker's process was replaced"
    assert all(w.up for w in backend.workers())
    assert asyncio.run(all_free(backend))


def test_drain_over_http_and_what_it_refuses(deployment):
    """The admin endpoints on the real backend: drain decode worker 1 (health says so), refuse
    to drain the last one taking requests, undrain; bad targets are named."""
    backend = deployment.backend

    async def post(session, url, body):
        async with session.post(
            url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=aiohttp.ClientTimeout(total=150)
        ) as response:
            return response.status, await response.json()

    async def main():
        handle = await asyncio.wait_for(serve(backend, 0, 0, "127.0.0.1", security=Security(api_keys=(KEY,))), 150)
        base = f"http://127.0.0.1:{handle.http_port}"
        try:
            async with aiohttp.ClientSession() as session:
                assert await post(session, f"{base}/admin/drain", {"role": "decode", "index": 1}) == (
                    200,
                    {"role": "decode", "index": 1, "draining": True, "moved": 0},
                )
                async with session.get(f"{base}/health") as response:
                    assert (response.status, await response.json()) == (
                        200,
                        {"status": "ok", "draining": ["decode worker 1"]},
                    )
                status, error = await post(session, f"{base}/admin/drain", {"role": "decode", "index": 0})
                assert status == 400 and "would leave no decode worker taking requests" in error["error"]["message"]
                assert await post(session, f"{base}/admin/undrain", {"role": "decode", "index": 1}) == (
                    200,
                    {"role": "decode", "index": 1, "draining": False},
                )
                status, error = await post(session, f"{base}/admin/drain", {"role": "decode", "index": 2})
                assert (
                    status == 400 and "there is no decode worker 2: its indices are [0, 1]" in error["error"]["message"]
                )
        finally:
            await asyncio.wait_for(handle.stop(0.5), 150)
        with pytest.raises(ValueError, match=r"role must be one of \['decode', 'prefill'\], got 'colocated'"):
            await backend.drain("colocated", 0)
        with pytest.raises(ValueError, match=r"there is no decode worker 2: its indices are \[0, 1\]"):
            await backend.drain("decode", 2)

    asyncio.run(main())
    assert backend.is_ready() and all(not v.draining for v in backend.policy.decode)

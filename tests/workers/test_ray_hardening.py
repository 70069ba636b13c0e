"""Nothing held longer than needed, admission that queues, and health that tells the truth,
on a real local Ray cluster behind the real servers.

Transfers get a 60 s deadline here, so blocks that come back within the tests' (generous)
polling bounds came back because the request was aborted, not because a deadline passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from deploy.cluster import WorkerGroup, deploy  # noqa: E402
from engine import EngineConfig, SamplingParams  # noqa: E402
from proto.serving import GenerateRequest  # noqa: E402
from router.server import serve  # noqa: E402
from tests.checkpoints import hf_greedy  # noqa: E402
from tests.workers.local_ray import start_local_ray  # noqa: E402

DEADLINE_S = 60.0  # transfer deadline: far beyond every wait below
SETTLE_S = 20.0  # how long the tests wait for gauges to come back (far below DEADLINE_S)
GAUGES = ("num_waiting", "num_running", "num_reserved", "num_held", "num_transfers")


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir):
    start_local_ray(4)
    # Few decode slots, so that concurrent long prompts must queue for them.
    groups = [WorkerGroup("prefill", 1), WorkerGroup("decode", 1, max_num_seqs=4)]
    dep = deploy(
        tiny_llama_dir,
        groups,
        EngineConfig(max_num_batched_tokens=32, num_blocks=96),
        kv_backend="shm",
        model_name="tiny",
        local_prefill_tokens=0,
        transfer_timeout_s=DEADLINE_S,
    )
    yield dep
    dep.shutdown()
    ray.shutdown()


async def collect(backend, rid, prompt, params, cancel_after: int | None = None):
    """The request's deltas; with cancel_after, the stream is closed after that many deltas."""
    deltas = []
    async with contextlib.aclosing(backend.generate(GenerateRequest(rid, prompt, params))) as stream:
        async for delta in stream:
            deltas.append(delta)
            if cancel_after is not None and len(deltas) >= cancel_after:
                break
    return deltas


async def settled(backend) -> dict:
    """Wait until every worker's gauges are back to 0 and every block is free; the stats."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        await backend.refresh()
        stats = backend.stats()
        busy = {
            f"{role}_{g}": stats[f"{role}_{g}"]
            for role in ("prefill", "decode")
            for g in GAUGES
            if stats[f"{role}_{g}"]
        }
        free = {r: stats[f"{r}_num_free_blocks"] == stats[f"{r}_num_blocks"] for r in ("prefill", "decode")}
        up = all(w.up for w in backend.workers())  # a down worker's gauges are not in the sums
        if not busy and all(free.values()) and up:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"still held after {SETTLE_S} s: {busy}, blocks free: {free}")
        await asyncio.sleep(0.05)


def test_long_prompts_queue_for_decode_room_instead_of_failing(deployment, tiny_llama_dir):
    backend = deployment.backend
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = {f"q{i}": list(range(5 + i % 7, 5 + i % 7 + 60 + i)) for i in range(24)}  # 6x the decode slots

    async def main():
        results = await asyncio.gather(*(collect(backend, r, p, params) for r, p in prompts.items()))
        await settled(backend)
        return dict(zip(prompts, results, strict=True))

    results = asyncio.run(main())
    for rid in ("q0", "q13", "q23"):
        tokens = [t for d in results[rid] for t in d.token_ids]
        assert tokens == hf_greedy(tiny_llama_dir, prompts[rid], 6, ignore_eos=True)
    assert all(r[-1].finish_reason == "length" for r in results.values())


def test_300_cancels_at_random_points_leave_nothing_held(deployment):
    backend = deployment.backend
    rng = random.Random(7)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def one(i: int) -> None:
        prompt = [rng.randrange(5, 300) for _ in range(rng.randrange(8, 120))]
        task = asyncio.create_task(collect(backend, f"c{i}", prompt, params, cancel_after=rng.randrange(0, 6) or None))
        await asyncio.sleep(rng.random() * 0.2)
        task.cancel()  # anywhere: queued for room, reserving, prefilling, transferring, decoding or done
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def main():
        for start in range(0, 300, 50):
            await asyncio.gather(*(one(i) for i in range(start, start + 50)))
        return await settled(backend)

    stats = asyncio.run(main())
    assert stats["decode_num_workers_up"] == 1 and stats["prefill_num_workers_up"] == 1


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_per_worker_gauges_then_a_dead_prefill_worker(deployment, tiny_llama_dir):
    """Runs last: it kills the prefill worker under requests waiting for their KV. Each of them
    is run again with its prompt prefilled on the decode worker (degraded) and answers
    token-exact; the reservations of the failed prefills are given back at once; health says
    "degraded" with no request arriving, the worker's up gauge says which worker is gone, and
    new long prompts are still served."""
    backend = deployment.backend
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def main():
        handle = await serve(backend, 0, 0, "127.0.0.1")
        base = f"http://127.0.0.1:{handle.http_port}"
        try:
            await collect(backend, "warm", list(range(5, 60)), params)
            # The prefill worker lets go of the request's blocks when the decode worker's "pulled"
            # note reaches it, which can be after the last token: wait for the gauges to settle.
            settled = (
                'tandem_worker_up{role="prefill",worker="0"} 1.0',
                'tandem_worker_up{role="decode",worker="0"} 1.0',
                'tandem_worker_num_reserved{role="decode",worker="0"} 0.0',
                'tandem_worker_num_transfers{role="prefill",worker="0"} 0.0',
                'tandem_worker_num_held{role="prefill",worker="0"} 0.0',
            )
            deadline = time.monotonic() + SETTLE_S
            while True:
                status, text = await asyncio.to_thread(_get, base + "/metrics")  # a scrape refreshes
                assert status == 200
                missing = [line for line in settled if line not in text]
                if not missing:
                    break
                assert time.monotonic() < deadline, missing
                await asyncio.sleep(0.05)
            # Long prompts in flight, then the prefill worker dies under them.
            prompts = [list(range(5 + i, 300)) for i in range(6)]
            tasks = [asyncio.create_task(collect(backend, f"k{i}", p, params)) for i, p in enumerate(prompts)]
            deadline = time.monotonic() + SETTLE_S
            while backend.stats()["decode_num_reserved"] == 0:  # some wait for their KV now
                assert time.monotonic() < deadline, "no request was reserved"
                await backend.refresh()
            ray.kill(deployment.prefill_actors[0])
            results = await asyncio.gather(*tasks)
            for prompt, deltas in zip(prompts, results, strict=True):
                assert [t for d in deltas for t in d.token_ids] == hf_greedy(tiny_llama_dir, prompt, 4, ignore_eos=True)
                assert deltas[-1].finish_reason == "length"
            assert backend.counters["recoveries_total"] >= 1  # at least the ones that waited for their KV
            # The decode worker gave back every reservation at once, not at the 60 s deadline.
            deadline = time.monotonic() + SETTLE_S
            while True:
                await backend.refresh()
                s = backend.stats()
                if (
                    s["decode_num_reserved"] == s["decode_num_transfers"] == 0
                    and s["decode_num_free_blocks"] == s["decode_num_blocks"]
                ):
                    break
                assert time.monotonic() < deadline, s
                await asyncio.sleep(0.05)
            # Health turns "degraded" by itself: the server watches its workers, requests or not.
            deadline = time.monotonic() + SETTLE_S
            while json.loads((await asyncio.to_thread(_get, base + "/health"))[1])["status"] != "degraded":
                assert time.monotonic() < deadline, "/health stayed ok with the prefill worker dead"
                await asyncio.sleep(0.05)
            status, text = await asyncio.to_thread(_get, base + "/health")
            assert status == 200 and json.loads(text) == {
                "status": "degraded",
                "down": ["prefill worker 0"],
                "workers": {"prefill": {"up": 0, "total": 1}, "decode": {"up": 1, "total": 1}},
            }
            status, text = await asyncio.to_thread(_get, base + "/metrics")
            assert 'tandem_worker_up{role="prefill",worker="0"} 0.0' in text
            assert 'tandem_worker_num_waiting{role="prefill",worker="0"}' not in text  # no made-up stats
            # A new long prompt: prefilled on the decode worker, and counted as degraded.
            before = backend.counters["degraded_prefills_total"]
            body = json.dumps({"model": "tiny", "prompt": list(range(5, 100)), "max_tokens": 2}).encode()
            request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
            with await asyncio.to_thread(urllib.request.urlopen, request, None, 30) as response:
                assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 2
            assert backend.counters["degraded_prefills_total"] == before + 1
        finally:
            await handle.stop(0.5)

    asyncio.run(main())

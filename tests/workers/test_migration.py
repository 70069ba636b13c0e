"""Live migration of a running request between decode workers, in process, over every KV
transport.

The router detaches a decoding request from its worker, the destination reserves blocks for
its prompt and the tokens so far, the source copies the KV there through the same transport
a prefill uses, and the stream goes on from the next token: one stream, token-exact against
transformers, with every block free on every worker afterwards. A migration that fails after
the detach (the destination refuses the request, or does not hold the deployment's KV
secret) leaves the request running where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import replace

import pytest

from decode_worker.actor import DecodeActor
from decode_worker.worker import DecodeWorker
from engine import EngineConfig, SamplingParams
from kv_transfer.registry import backend_names
from prefill_worker.actor import PrefillActor
from proto.serving import GenerateRequest
from router.orchestrator import DisaggregatedBackend
from tests.checkpoints import hf_greedy
from tests.kv_transfer.peer import TEST_SECRET

BACKENDS = tuple(name for name in backend_names() if name != "slow_shm")
MAX_TOKENS = 40
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
CONFIG = EngineConfig(max_num_batched_tokens=64, num_blocks=128)


def make_backend(model_dir, prefill, decode) -> DisaggregatedBackend:
    return DisaggregatedBackend(
        model_dir,
        prefill,
        decode,
        model_name="tiny",
        max_model_len=512,  # the tiny model's
        block_size=CONFIG.block_size,
        kv_bytes_per_token=1,
        local_prefill_tokens=0,
    )


@pytest.fixture(scope="module", params=BACKENDS)
def deployment(request, tiny_llama_dir):
    """1 prefill and 2 decode workers (in process) on one KV transport."""
    kv = request.param
    prefill = PrefillActor(str(tiny_llama_dir), CONFIG, kv, transfer_timeout_s=20.0, kv_secret=TEST_SECRET)
    decode = [
        DecodeActor(str(tiny_llama_dir), CONFIG, kv, "127.0.0.1", transfer_timeout_s=20.0, kv_secret=TEST_SECRET)
        for _ in range(2)
    ]
    yield kv, prefill, decode
    for actor in (prefill, *decode):
        actor.shutdown()


async def stream_until(backend, rid, prompt, params, after: int, then):
    """Stream one request; once `after` tokens came, await then(); returns (tokens, deltas, then's result)."""
    tokens, deltas, outcome = [], [], None
    async with contextlib.aclosing(backend.generate(GenerateRequest(rid, tuple(prompt), params))) as s:
        async for delta in s:
            deltas.append(delta)
            tokens.extend(delta.token_ids)
            if outcome is None and len(tokens) >= after:
                outcome = asyncio.ensure_future(then())
    return tokens, deltas, await outcome if outcome is not None else None


async def blocks_free(actors, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = [await a.stats() for a in actors]
        if all(s.num_free_blocks == s.num_blocks for s in stats):
            return True
        await asyncio.sleep(0.02)
    return False


def where_it_runs(backend, rid) -> int:
    return backend._runs[backend._attempts.get(rid, rid)].decode


def test_a_request_migrates_mid_stream_token_exact_and_every_block_is_freed(deployment, tiny_llama_dir):
    kv, prefill, decode = deployment
    backend = make_backend(tiny_llama_dir, [prefill], decode)
    prompt = list(range(3, 60))  # four blocks of 16 and a part: full blocks and a tail move

    async def main():
        async def migrate():
            return await backend.migrate("m1")

        tokens, deltas, migration = await stream_until(backend, "m1", prompt, PARAMS, 10, migrate)
        return tokens, deltas, migration, await blocks_free([prefill, *decode])

    tokens, deltas, migration, free = asyncio.run(main())
    assert tokens == hf_greedy(tiny_llama_dir, prompt, MAX_TOKENS, True), kv
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason == "length"
    assert all(d.request_id == "m1" for d in deltas)
    assert migration.request_id == "m1" and {migration.source, migration.destination} == {0, 1}
    assert len(prompt) + 10 <= migration.num_tokens < len(prompt) + MAX_TOKENS
    assert 0 < migration.copy_s <= migration.pause_s
    assert backend.counters["migrations_total"] == 1 and backend.counters["migration_failures_total"] == 0
    assert backend.counters["recoveries_total"] == 0
    assert free, "a block stayed allocated on some worker"


def test_a_request_migrates_twice_and_back(deployment, tiny_llama_dir):
    """A migrated run is a run like any other: it migrates again (back to where it began)."""
    kv, prefill, decode = deployment
    backend = make_backend(tiny_llama_dir, [prefill], decode)
    prompt = list(range(9, 30))
    # Long enough that the request is still decoding when it migrates back, however slow the
    # migrations are on a busy machine (40 tokens could all stream in between).
    max_tokens = 300
    params = replace(PARAMS, max_tokens=max_tokens)

    async def main():
        async def twice():
            first = await backend.migrate("m2")
            await asyncio.sleep(0.05)
            second = await backend.migrate("m2", to=first.source)
            return first, second

        tokens, _, (first, second) = await stream_until(backend, "m2", prompt, params, 5, twice)
        return tokens, first, second, await blocks_free([prefill, *decode])

    tokens, first, second, free = asyncio.run(main())
    assert tokens == hf_greedy(tiny_llama_dir, prompt, max_tokens, True), kv
    assert (second.source, second.destination) == (first.destination, first.source)
    assert second.num_tokens > first.num_tokens
    assert free


def test_a_failed_migration_leaves_the_request_running_where_it_was(deployment, tiny_llama_dir):
    """The destination refuses the request after the detach (its context window is too small
    for it): what it reserved is undone, the request is reattached on its source and ends there,
    token-exact."""
    kv, prefill, decode = deployment
    small = DecodeActor(
        str(tiny_llama_dir),
        EngineConfig(max_num_batched_tokens=64, num_blocks=128, max_model_len=48),
        kv,
        "127.0.0.1",
        kv_secret=TEST_SECRET,
    )
    try:
        backend = make_backend(tiny_llama_dir, [prefill], [decode[0], small])
        prompt = list(range(4, 44))  # 40 tokens: fits the small worker's window, not with 10 more

        async def main():
            async def migrate():
                where = where_it_runs(backend, "f1")
                with pytest.raises(RuntimeError, match="migrating to decode worker 1 failed: .*context window"):
                    await backend.migrate("f1", to=1)
                while backend._attempts["f1"] != "f1" or "f1" not in backend._runs:  # its run again, reattached
                    await asyncio.sleep(0.01)
                return where, where_it_runs(backend, "f1")

            tokens, _, where = await stream_until(backend, "f1", prompt, PARAMS, 10, migrate)
            return tokens, where, await blocks_free([prefill, decode[0], small])

        tokens, (before, after), free = asyncio.run(main())
        assert tokens == hf_greedy(tiny_llama_dir, prompt, MAX_TOKENS, True), kv
        assert before == after == 0
        assert backend.counters["migration_failures_total"] == 1 and backend.counters["migrations_total"] == 0
        assert backend.counters["recoveries_total"] == 0
        assert free
    finally:
        small.shutdown()


def test_a_destination_without_the_kv_secret_gets_nothing_and_the_request_goes_on(deployment, tiny_llama_dir):
    """The KV data plane is authenticated for migrations as for prefills: the copy to a worker
    holding another secret fails at the handshake, and the request goes on at its source."""
    kv, prefill, decode = deployment
    stranger = DecodeActor(str(tiny_llama_dir), CONFIG, kv, "127.0.0.1", kv_secret=b"another deployment's secret!!!!")
    try:
        backend = make_backend(tiny_llama_dir, [prefill], [decode[0], stranger])
        prompt = list(range(11, 40))

        async def main():
            async def migrate():
                with pytest.raises(RuntimeError, match="migrating to decode worker 1 failed"):
                    await backend.migrate("s1", to=1)

            tokens, _, _ = await stream_until(backend, "s1", prompt, PARAMS, 8, migrate)
            return tokens, await blocks_free([prefill, decode[0], stranger])

        tokens, free = asyncio.run(main())
        assert tokens == hf_greedy(tiny_llama_dir, prompt, MAX_TOKENS, True), kv
        assert backend.counters["migration_failures_total"] == 1
        assert free
    finally:
        stranger.shutdown()


def test_what_cannot_migrate_is_refused_by_name(deployment, tiny_llama_dir):
    kv, prefill, decode = deployment
    backend = make_backend(tiny_llama_dir, [prefill], decode)

    async def main():
        with pytest.raises(ValueError, match="request 'nobody' is not in flight"):
            await backend.migrate("nobody")

        async def checks():
            src = where_it_runs(backend, "r1")
            with pytest.raises(ValueError, match=f"cannot migrate 'r1' to decode worker {src}: it is where it runs"):
                await backend.migrate("r1", to=src)
            with pytest.raises(ValueError, match=r"there is no decode worker 5: its indices are \[0, 1\]"):
                await backend.migrate("r1", to=5)

        tokens, _, _ = await stream_until(backend, "r1", list(range(5, 25)), PARAMS, 3, checks)
        return tokens

    prompt = list(range(5, 25))
    assert asyncio.run(main()) == hf_greedy(tiny_llama_dir, prompt, MAX_TOKENS, True)


def test_a_request_not_decoding_yet_is_not_detached(tiny_llama_dir):
    """Detach refuses a request still waiting or prefilling, and it goes on untouched."""
    config = EngineConfig(max_num_batched_tokens=16, num_blocks=64)
    worker = DecodeWorker(tiny_llama_dir, config, "shm", kv_secret=TEST_SECRET)
    try:
        finished = threading.Event()
        tokens: list[int] = []

        def on_delta(d):
            tokens.extend(d.token_ids)
            if d.finished:
                finished.set()

        prompt = list(range(3, 80))  # five 16-token chunks: it is prefilling for a while
        worker.generate(GenerateRequest("p1", tuple(prompt), PARAMS), on_delta)
        with pytest.raises(ValueError, match="p1 cannot be detached: it is (not decoding yet|not running here)"):
            worker.detach("p1").result(30)
        assert finished.wait(60)
        assert tokens == hf_greedy(tiny_llama_dir, prompt, MAX_TOKENS, True)
        with pytest.raises(ValueError, match="p1 cannot be detached: it is not running here"):
            worker.detach("p1").result(30)
        assert worker.stats().num_free_blocks == worker.stats().num_blocks
    finally:
        worker.close()


def test_a_decode_worker_short_of_kv_blocks_sheds_a_request_to_one_with_room(tiny_llama_dir):
    """Load balancing by migration: a request whose growth fills its worker's KV cache past
    the high mark moves to the other decode worker, with its KV, instead of staying to be
    preempted; it ends token-exact. The router looks at the workers' stats as its server
    does (every STATS_INTERVAL_S; faster here)."""
    small = EngineConfig(max_num_batched_tokens=64, num_blocks=28, max_model_len=448)  # 448 tokens of KV
    decode = [
        DecodeActor(str(tiny_llama_dir), config, "shm", "127.0.0.1", kv_secret=TEST_SECRET)
        for config in (small, EngineConfig(max_num_batched_tokens=64, num_blocks=128, max_model_len=512))
    ]
    try:
        backend = make_backend(tiny_llama_dir, [], decode)
        prompt = list(range(5, 35))
        params = SamplingParams(temperature=0.0, max_tokens=440, ignore_eos=True)  # 470: more than 448

        async def main():
            backend.policy.decode[1].draining = True  # it starts on the small worker

            async def watch():
                while True:
                    await backend.refresh()
                    await asyncio.sleep(0.005)

            async def undrain():
                backend.undrain("decode", 1)

            watcher = asyncio.ensure_future(watch())
            try:
                tokens, _, _ = await stream_until(backend, "p1", prompt, params, 1, undrain)
            finally:
                watcher.cancel()
            return tokens, await blocks_free(decode)

        tokens, free = asyncio.run(main())
        assert tokens == hf_greedy(tiny_llama_dir, prompt, 440, True)
        assert backend.counters["pressure_migrations_total"] == backend.counters["migrations_total"] == 1
        (moved,) = backend.migrations
        assert (moved.source, moved.destination) == (0, 1)
        assert moved.num_tokens >= 0.9 * 448 - 16  # it moved once its worker was about 90% full
        assert free
    finally:
        for actor in decode:
            actor.shutdown()


def test_an_operator_migrates_a_request_over_http_and_bad_calls_are_named(tiny_llama_dir):
    """POST /admin/migrate on a real server (API keys on): a running request moves, named by
    the id its client sees; what cannot be done is a 400 naming the field."""
    import aiohttp

    from router.security import Security
    from router.server import serve

    key = "sk-admin-migrate"
    decode = [DecodeActor(str(tiny_llama_dir), CONFIG, "shm", "127.0.0.1", kv_secret=TEST_SECRET) for _ in range(2)]
    backend = make_backend(tiny_llama_dir, [], decode)
    prompt = list(range(6, 50))

    async def main():
        handle = await serve(backend, 0, 0, "127.0.0.1", security=Security(api_keys=(key,)))
        url = f"http://127.0.0.1:{handle.http_port}/admin/migrate"
        headers = {"Authorization": f"Bearer {key}"}
        try:
            async with aiohttp.ClientSession() as session:

                async def post(body):
                    async with session.post(url, json=body, headers=headers) as response:
                        return response.status, await response.json()

                async def migrate():
                    return await post({"request_id": "h1"})

                tokens, _, moved = await stream_until(backend, "h1", prompt, PARAMS, 5, migrate)
                refused = [
                    await post({"request_id": "h1"}),  # finished: no longer in flight
                    await post({"request_id": 7}),
                    await post({"request_id": "h1", "to": -1}),
                ]
                async with session.post(url, json={"request_id": "h1"}) as response:
                    unauthorized = response.status
        finally:
            await handle.stop(0.5)
        return tokens, moved, refused, unauthorized

    try:
        tokens, (status, moved), refused, unauthorized = asyncio.run(main())
    finally:
        for actor in decode:
            actor.shutdown()
    assert tokens == hf_greedy(tiny_llama_dir, prompt, MAX_TOKENS, True)
    assert status == 200, moved
    assert moved["request_id"] == "h1" and {moved["source"], moved["destination"]} == {0, 1}
    assert moved["num_tokens"] >= len(prompt) + 5 and moved["pause_s"] >= moved["copy_s"] > 0
    assert [s for s, _ in refused] == [400, 400, 400]
    assert "request 'h1' is not in flight" in refused[0][1]["error"]["message"]
    assert refused[1][1]["error"]["param"] == "request_id" and refused[2][1]["error"]["param"] == "to"
    assert unauthorized == 401


def test_a_copy_cut_halfway_leaves_the_request_whole_on_its_source(tiny_llama_dir):
    """The copy's deadline passes while a layer is still being written (slow_shm: every layer
    write takes a second; the deadline is 1.5 s for two layers): the source frees nothing
    while the write is in flight, the destination's blocks come back, and the request goes
    on at its source, token-exact."""
    config = EngineConfig(max_num_batched_tokens=64, num_blocks=64)
    decode = [
        DecodeActor(str(tiny_llama_dir), config, "slow_shm", "127.0.0.1", transfer_timeout_s=1.5, kv_secret=TEST_SECRET)
        for _ in range(2)
    ]
    try:
        backend = make_backend(tiny_llama_dir, [], decode)
        prompt = list(range(7, 41))
        params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

        async def main():
            backend.policy.decode[1].draining = True  # it starts on worker 0

            async def migrate():
                backend.undrain("decode", 1)
                with pytest.raises(RuntimeError, match="migrating to decode worker 1 failed: .*deadline"):
                    await backend.migrate("h1", to=1)

            tokens, _, _ = await stream_until(backend, "h1", prompt, params, 5, migrate)
            return tokens, await blocks_free(decode)

        tokens, free = asyncio.run(main())
        assert tokens == hf_greedy(tiny_llama_dir, prompt, 60, True)
        assert backend.counters["migration_failures_total"] == 1 and backend.counters["migrations_total"] == 0
        assert free
    finally:
        for actor in decode:
            actor.shutdown()

"""Workers that change role while the router serves (elastic/role_actor.py, router/rebalance.py
change_role), in process: one engine, loaded once, under a prefill or a decode shell.

A role change under load drains the worker (its decoding requests migrate with their KV),
switches its shell and routes to it in its new role: every request ends token-exact against
transformers, none is lost, every block is free afterwards, and the engine is the same object
(no model reload). The worker then serves in its new role, and changes back.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from elastic.role_actor import RoleActor
from engine import EngineConfig, SamplingParams
from proto.errors import Unavailable
from proto.serving import GenerateRequest, Role
from router.rebalance import change_role
from tests.checkpoints import hf_greedy
from tests.kv_transfer.peer import TEST_SECRET
from tests.workers.test_migration import CONFIG, blocks_free, make_backend

MAX_TOKENS = 24
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture
def workers(tiny_llama_dir):
    """1 prefill and 2 decode workers that can change role, over shm."""
    actors = [
        RoleActor(str(tiny_llama_dir), CONFIG, "shm", role, "127.0.0.1", 20.0, kv_secret=TEST_SECRET)
        for role in (Role.PREFILL, Role.DECODE, Role.DECODE)
    ]
    yield actors
    for actor in actors:
        actor.shutdown()


async def collect(backend, rid, prompt) -> list[int]:
    tokens: list[int] = []
    async with contextlib.aclosing(backend.generate(GenerateRequest(rid, tuple(prompt), PARAMS))) as stream:
        async for delta in stream:
            tokens.extend(delta.token_ids)
    return tokens


def prompts(n: int) -> list[list[int]]:
    return [list(range(5 + i, 45 + 3 * i)) for i in range(n)]


def test_a_decode_worker_becomes_a_prefill_worker_under_load_and_back(workers, tiny_llama_dir):
    prefill, decode0, decode1 = workers
    backend = make_backend(tiny_llama_dir, [prefill], [decode0, decode1])
    engine = decode1.engine
    batch = prompts(6)

    async def main():
        await backend.refresh()
        streams = [asyncio.ensure_future(collect(backend, f"r{i}", p)) for i, p in enumerate(batch)]
        while sum(run.num_tokens > 0 for run in backend._runs.values()) < 3:  # some decoding
            await asyncio.sleep(0.01)
        to_prefill = await change_role(backend, Role.DECODE, 1)
        during = await asyncio.gather(*streams)
        # The worker prefills now (the other prefill worker set aside): new requests' KV goes
        # from it to decode worker 0.
        await backend.drain(Role.PREFILL, 0)
        transfers = backend.counters["kv_transfers_total"]
        after = await asyncio.gather(*(collect(backend, f"s{i}", p) for i, p in enumerate(batch[:3])))
        prefilled_by_it = backend.counters["kv_transfers_total"] - transfers
        backend.undrain(Role.PREFILL, 0)
        back = await change_role(backend, Role.PREFILL, to_prefill.after[1])
        again = await collect(backend, "t0", batch[0])
        return to_prefill, back, during, after, again, prefilled_by_it, await blocks_free(workers)

    to_prefill, back, during, after, again, prefilled, free = asyncio.run(main())
    expected = [hf_greedy(tiny_llama_dir, p, MAX_TOKENS, True) for p in batch]
    assert during == expected, "a request that was on the worker changing role lost or changed tokens"
    assert after == expected[:3] and again == expected[0]
    assert to_prefill.before == (Role.DECODE, 1) and to_prefill.after == (Role.PREFILL, 1)
    assert back.before == (Role.PREFILL, 1) and back.after == (Role.DECODE, 1), "its decode index is kept"
    assert to_prefill.moved >= 1 and backend.counters["migrations_total"] >= 1
    assert backend.counters["role_changes_total"] == 2 and backend.counters["recovery_failures_total"] == 0
    assert prefilled == 3, "the worker in its new role did not prefill"
    assert decode1.engine is engine and decode1.role_changes == 2, "the engine was rebuilt"
    assert free, "a block stayed allocated on some worker"
    assert [(w.role, w.index) for w in backend.workers()] == [
        (Role.PREFILL, 0),
        (Role.DECODE, 0),
        (Role.DECODE, 1),
    ]


def test_a_prefill_worker_becomes_a_decode_worker_and_the_split_is_colocated(workers, tiny_llama_dir):
    """With its only prefill worker turned to decoding, every worker prefills its own prompts
    (the 0:n split the rebalancer may choose): served, not degraded."""
    prefill, decode0, decode1 = workers
    backend = make_backend(tiny_llama_dir, [prefill], [decode0, decode1])
    batch = prompts(3)

    async def main():
        await backend.refresh()
        change = await change_role(backend, Role.PREFILL, 0)
        tokens = await asyncio.gather(*(collect(backend, f"c{i}", p) for i, p in enumerate(batch)))
        await backend.refresh()
        return change, tokens, backend.stats()

    change, tokens, stats = asyncio.run(main())
    assert change.after == (Role.DECODE, 2) and change.moved == 0
    assert tokens == [hf_greedy(tiny_llama_dir, p, MAX_TOKENS, True) for p in batch]
    assert stats["prefill_num_workers_up"] == 0 and stats["decode_num_workers_up"] == 3
    assert backend.counters["degraded_prefills_total"] == 0 and backend.counters["kv_transfers_total"] == 0
    with pytest.raises(ValueError, match="no prefill worker 0"):
        backend.client(Role.PREFILL, 0)


def test_role_changes_are_refused_by_name(workers, tiny_llama_dir):
    prefill, decode0, decode1 = workers
    backend = make_backend(tiny_llama_dir, [prefill], [decode0])

    async def main():
        await backend.refresh()
        with pytest.raises(ValueError, match="no decode worker taking requests"):
            await change_role(backend, Role.DECODE, 0)  # the last one
        assert not backend.policy.decode[0].draining, "a refused change left the worker out of routing"
        with pytest.raises(ValueError, match="no decode worker 3"):
            await change_role(backend, "decode", 3)
        with pytest.raises(ValueError, match="role must be one of"):
            await change_role(backend, "router", 0)
        with pytest.raises(ValueError, match="role must be one of"):
            await decode1.set_role("both")
        with pytest.raises(Unavailable, match="serves as a decode worker"):
            await decode1.prefill(GenerateRequest("x", (1, 2, 3), PARAMS), None)  # type: ignore[arg-type]
        assert await decode1.set_role(Role.DECODE) == 0.0  # what it is already

    asyncio.run(main())
    with pytest.raises(ValueError, match="runs one rank"):
        RoleActor(str(tiny_llama_dir), EngineConfig(tensor_parallel_size=2), "shm", "decode", kv_secret=TEST_SECRET)

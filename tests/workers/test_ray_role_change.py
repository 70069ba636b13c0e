"""Workers that change role, on a real local Ray cluster (deploy(elastic=True), the workers of
`tandem serve --autoscale`).

A decode worker turns prefill worker while streams run on it (they migrate off it, token-
exact), then prefills (its KV pushed to the other decode worker), and turns back. Killed
(-9) after a role change, Ray restarts it in the role it was started with; the router's
client puts it back in the role it had, and it serves there again.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from proto.serving import Role  # noqa: E402
from router.rebalance import change_role  # noqa: E402
from tests.workers.local_ray import (  # noqa: E402
    assert_exact,
    deploy_two_decoders,
    greedy,
    pid_of,
    start_local_ray,
    stream,
)
from tests.workers.test_ray_serving import all_free  # noqa: E402

MAX_TOKENS = 60
PARAMS = greedy(MAX_TOKENS)


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir):
    start_local_ray(4)
    dep = deploy_two_decoders(tiny_llama_dir, max_restarts=2, elastic=True)
    yield dep
    dep.shutdown()
    ray.shutdown()


def test_a_decode_worker_changes_role_under_load_and_back_on_ray(deployment, tiny_llama_dir):
    backend = deployment.backend
    prompts = {f"e{i}": list(range(5 + i, 40 + 2 * i)) for i in range(8)}
    later = {f"f{i}": list(range(7 + i, 30 + i)) for i in range(3)}

    async def main():
        started = {rid: asyncio.Event() for rid in prompts}
        tasks = {rid: asyncio.create_task(stream(backend, rid, p, PARAMS, started[rid])) for rid, p in prompts.items()}
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 120)
        change = await change_role(backend, Role.DECODE, 1)
        results = {rid: await t for rid, t in tasks.items()}
        await backend.drain(Role.PREFILL, 0)  # only the worker that changed role prefills now
        transfers = backend.counters["kv_transfers_total"]
        served = await asyncio.gather(*(stream(backend, r, p, PARAMS) for r, p in later.items()))
        results |= dict(zip(later, served, strict=True))
        prefilled = backend.counters["kv_transfers_total"] - transfers
        backend.undrain(Role.PREFILL, 0)
        back = await change_role(backend, Role.PREFILL, change.after[1])
        results["g"] = await stream(backend, "g", prompts["e0"], PARAMS)
        return change, back, results, prefilled

    change, back, results, prefilled = asyncio.run(main())
    assert change.before == (Role.DECODE, 1) and change.after == (Role.PREFILL, 1)
    assert back.after == (Role.DECODE, 1)
    assert change.moved >= 1 and backend.counters["migrations_total"] >= 1
    assert prefilled == len(later), "the worker in its new role did not prefill"
    assert_exact(results, prompts | later | {"g": prompts["e0"]}, tiny_llama_dir, MAX_TOKENS)
    assert backend.counters["recovery_failures_total"] == 0
    assert asyncio.run(all_free(backend))


def test_a_worker_killed_after_a_role_change_comes_back_in_its_new_role(deployment, tiny_llama_dir):
    backend = deployment.backend
    actor = deployment.decode_actors[0]  # started as decode worker 0

    async def main():
        await backend.refresh()
        change = await change_role(backend, Role.DECODE, 0)
        os.kill(pid_of(actor), signal.SIGKILL)
        await backend.drain(Role.PREFILL, 0)  # it must be the one to prefill
        await backend.wait_up(Role.PREFILL, change.after[1], 120)
        prompt = list(range(11, 50))
        transfers = backend.counters["kv_transfers_total"]
        deltas = await stream(backend, "k", prompt, PARAMS)
        prefilled = backend.counters["kv_transfers_total"] - transfers
        backend.undrain(Role.PREFILL, 0)
        await change_role(backend, Role.PREFILL, change.after[1])  # as it was, for the next test
        return change, prompt, deltas, prefilled

    change, prompt, deltas, prefilled = asyncio.run(main())
    assert change.after[0] is Role.PREFILL
    assert ray.get(actor.role_stats.remote(), timeout=60)[1] is Role.DECODE
    assert prefilled == 1, "the restarted worker did not prefill in its new role"
    assert_exact({"k": deltas}, {"k": prompt}, tiny_llama_dir, MAX_TOKENS)

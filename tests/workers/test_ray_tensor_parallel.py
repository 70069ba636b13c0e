"""Tensor-parallel workers on a real local Ray cluster, through deploy() and the router:
prefill TP=2 -> decode TP=1, prefill TP=1 and TP=2 -> decode TP=2 (one decode worker of each
kind in one deployment, so both pairings are served side by side), and pipeline stages on
both sides (PP=2 -> PP=2)."""

import asyncio
import contextlib

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from deploy.cluster import WorkerGroup, deploy  # noqa: E402
from engine import EngineConfig, SamplingParams  # noqa: E402
from proto.serving import GenerateRequest  # noqa: E402
from tests.checkpoints import hf_greedy  # noqa: E402
from tests.workers.local_ray import start_local_ray  # noqa: E402
from tests.workers.test_ray_serving import all_free, collect, tokens  # noqa: E402


@pytest.mark.parametrize(
    "groups, num_followers",
    [
        ([WorkerGroup("prefill", 1, tp=2), WorkerGroup("decode", 1)], 1),
        ([WorkerGroup("prefill", 1), WorkerGroup("prefill", 1, tp=2), WorkerGroup("decode", 1, tp=2)], 2),
        # pipeline stages on both sides, a stage per layer of the 2-layer model
        ([WorkerGroup("prefill", 1, pp=2), WorkerGroup("decode", 1, pp=2)], 2),
    ],
    ids=["prefill-tp2-decode-tp1", "prefill-tp1-and-tp2-decode-tp2", "prefill-pp2-decode-pp2"],
)
def test_tensor_parallel_workers_serve_transformers_tokens(tiny_llama_dir, groups, num_followers):
    start_local_ray(6)
    dep = None
    try:
        dep = deploy(
            tiny_llama_dir,
            groups,
            EngineConfig(dtype="float32", max_num_batched_tokens=32, num_blocks=64),
            kv_backend="shm",
            model_name="tiny",
            policy="round_robin",
            local_prefill_tokens=0,
            transfer_timeout_s=10.0,
        )
        assert len(dep.follower_actors) == num_followers
        backend = dep.backend
        params = SamplingParams(temperature=0.0, max_tokens=8)
        prompts = [list(range(5, 5 + n)) for n in (4, 33, 70, 21)]

        async def main():
            async def one(i, prompt):
                tokens = []
                async with contextlib.aclosing(backend.generate(GenerateRequest(f"tp{i}", prompt, params))) as stream:
                    async for delta in stream:
                        assert delta.error is None, delta.error
                        tokens += delta.token_ids
                return tokens

            results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            results.append(await one("again", prompts[0]))  # after the others: round robin visits both
            assert await all_free(backend)
            return results

        for prompt, tokens in zip(prompts + prompts[:1], asyncio.run(main()), strict=True):
            assert tokens == hf_greedy(tiny_llama_dir, prompt, 8)
        assert backend.stats()["kv_transfers_total"] == len(prompts) + 1
        # Ranks > 0 of decode workers hold no part of any transfer any more.
        counts = ray.get([a.num_transfers.remote() for a in dep.follower_actors if hasattr(a, "num_transfers")])
        assert all(n == 0 for n in counts)
    finally:
        if dep is not None:
            dep.shutdown()
        ray.shutdown()


def test_workers_the_cluster_cannot_hold_are_refused_naming_the_resource(tiny_llama_dir):
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ValueError, match=r"need 4 CPU \(the cluster has 3\)"):
            deploy(
                tiny_llama_dir,
                [WorkerGroup("prefill", 1, tp=2), WorkerGroup("decode", 1, tp=2)],
                EngineConfig(),
                kv_backend="shm",
                model_name="tiny",
            )
        with pytest.raises(ValueError, match=r"need 2 GPU \(the cluster has 0\)"):
            deploy(
                tiny_llama_dir,
                [WorkerGroup("decode", 1, tp=2, use_gpus=True)],
                EngineConfig(),
                kv_backend="shm",
                model_name="tiny",
            )
        assert ray.util.placement_group_table() == {}  # nothing was reserved
    finally:
        ray.shutdown()


def test_lost_decode_rank_fails_its_worker_and_the_rest_are_served(tiny_llama_dir):
    """A decode worker whose rank 1 died fails its request with an error naming it; the router
    runs that request again on the other decode worker, stops picking the broken one, and serves on."""
    start_local_ray(4)
    dep = None
    try:
        dep = deploy(
            tiny_llama_dir,
            [WorkerGroup("prefill", 1), WorkerGroup("decode", 1, tp=2), WorkerGroup("decode", 1)],
            EngineConfig(dtype="float32", max_num_batched_tokens=32, num_blocks=64),
            kv_backend="shm",
            model_name="tiny",
            policy="round_robin",
            local_prefill_tokens=0,
            transfer_timeout_s=10.0,
        )
        backend = dep.backend
        ray.kill(dep.follower_actors[0])
        params = SamplingParams(temperature=0.0, max_tokens=6)
        prompt = list(range(5, 30))

        def one(rid):
            return collect(backend, rid, prompt, params)

        async def main():
            first = await one("to-broken")  # round robin: decode worker 0, whose rank 1 is gone
            await backend.refresh()
            assert [w.up for w in backend.workers()] == [True, False, True]  # prefill, decode 0, decode 1
            assert backend.is_ready()  # decode worker 1 serves
            rest = [await one(f"after-{i}") for i in range(2)]
            return first, rest

        first, rest = asyncio.run(main())
        assert backend.counters["recoveries_total"] == 1
        for deltas in [first, *rest]:
            assert tokens(deltas) == hf_greedy(tiny_llama_dir, prompt, 6)
        assert ray.get(dep.decode_actors[1].stats.remote()).num_free_blocks == 64
    finally:
        if dep is not None:
            dep.shutdown()
        ray.shutdown()


def test_killed_prefill_stage_fails_its_worker_and_no_block_stays_held(tiny_llama_dir):
    """Stage 1 of a pp=2 prefill worker is killed on Ray: the request sent there fails and the
    router runs it again on the other prefill worker, token-exact; health names the broken
    worker; the decode worker gives back every block it reserved for the failed prefill."""
    start_local_ray(4)
    dep = None
    try:
        dep = deploy(
            tiny_llama_dir,
            [WorkerGroup("prefill", 1, pp=2), WorkerGroup("prefill", 1), WorkerGroup("decode", 1)],
            EngineConfig(dtype="float32", max_num_batched_tokens=32, num_blocks=64),
            kv_backend="shm",
            model_name="tiny",
            policy="round_robin",
            local_prefill_tokens=0,
            transfer_timeout_s=10.0,
        )
        backend = dep.backend
        ray.kill(dep.follower_actors[0])  # prefill worker 0's stage 1
        params = SamplingParams(temperature=0.0, max_tokens=6)
        prompt = list(range(5, 30))

        def one(rid):
            return collect(backend, rid, prompt, params)

        async def main():
            first = await one("to-broken")  # round robin: prefill worker 0, whose stage 1 is gone
            await backend.refresh()
            assert [w.up for w in backend.workers()] == [False, True, True]  # prefill 0, prefill 1, decode
            rest = [await one(f"after-{i}") for i in range(2)]
            assert await all_free(backend)
            return first, rest

        first, rest = asyncio.run(main())
        assert backend.counters["recoveries_total"] == 1
        for deltas in [first, *rest]:
            assert tokens(deltas) == hf_greedy(tiny_llama_dir, prompt, 6)
        assert ray.get(dep.decode_actors[0].stats.remote()).num_free_blocks == 64
    finally:
        if dep is not None:
            dep.shutdown()
        ray.shutdown()

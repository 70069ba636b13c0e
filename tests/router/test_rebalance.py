"""The P:D rebalancer's decisions on a scripted load (router/rebalance.py), carried out on real
in-process workers that change role (elastic/role_actor.py).

The load is scripted into what the router records of the requests it served (arrivals, and
finished requests' prompt and output lengths); the capacity model is the planner's, over the
roofline of Llama-2-7B on an A100 (where it tells prefill-heavy from decode-heavy loads
apart). The workers are four tiny-model engines: what is tested is which roles the controller
gives them and when, not their speed.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from elastic.role_actor import RoleActor
from engine import EngineConfig
from planner.latency.gpus import NodeHardware, gpu_spec
from planner.latency.models import resolve_model
from planner.latency.roofline import roofline
from planner.solve.capacity import WorkloadStats, kv_capacity_tokens
from proto.serving import Role
from proto.slo import SLOSpec
from router.orchestrator import DisaggregatedBackend
from router.rebalance import RebalanceConfig, Rebalancer, forecast_splits
from tests.kv_transfer.peer import TEST_SECRET

SLO = SLOSpec(ttft_s=0.4, tpot_s=0.1)
PROMPT_HEAVY = (2000, 50)  # (prompt, output) tokens
DECODE_HEAVY = (100, 600)


@pytest.fixture(scope="module")
def a100():
    model = resolve_model("llama-2-7b")
    gpu = gpu_spec("A100-80GB")
    hw = NodeHardware(gpu, gpu.memory_gb * 1e9, gpu.link_gb_s, 1.0)
    return roofline(model, hw, 1, 1), kv_capacity_tokens(model, hw, 1, 1)


def stats_of(prompt: int, output: int) -> WorkloadStats:
    return WorkloadStats(np.full(50, prompt), np.full(50, output), prompt + output)


def test_the_capacity_model_gives_prompt_heavy_loads_more_prefill_workers(a100):
    coeffs, kv = a100
    best = {
        load: max(forecast_splits(4, coeffs, stats_of(*load), SLO, kv, 16), key=lambda s: s.capacity_rps)
        for load in (PROMPT_HEAVY, DECODE_HEAVY)
    }
    assert best[PROMPT_HEAVY].prefill > best[DECODE_HEAVY].prefill
    splits = forecast_splits(4, coeffs, stats_of(*DECODE_HEAVY), SLO, kv, 16, min_prefill=1, min_decode=2)
    assert [(s.prefill, s.decode) for s in splits] == [(1, 3), (2, 2)]
    assert all(s.capacity_rps > 0 for s in splits)


@pytest.fixture
def backend(tiny_llama_dir):
    config = EngineConfig(num_blocks=64)
    actors = [
        RoleActor(str(tiny_llama_dir), config, "shm", role, "127.0.0.1", kv_secret=TEST_SECRET)
        for role in (Role.PREFILL, Role.PREFILL, Role.DECODE, Role.DECODE)
    ]
    yield DisaggregatedBackend(
        tiny_llama_dir,
        actors[:2],
        actors[2:],
        model_name="tiny",
        max_model_len=512,
        block_size=16,
        kv_bytes_per_token=1,
    )
    for actor in actors:
        actor.shutdown()


def script(backend: DisaggregatedBackend, rate: float, prompt: int, output: int, window_s: float = 60.0) -> None:
    """The router's record of the last window_s: Poisson-like arrivals at `rate`, all finished."""
    backend.arrivals.clear()
    backend.finished.clear()
    now = time.monotonic()
    rng = np.random.default_rng(0)
    t = now - window_s
    while (t := t + float(rng.exponential(1 / rate))) < now:
        backend.arrivals.append((t, prompt, output))
        backend.finished.append((t, prompt, output))


def test_the_split_follows_a_load_shift_one_worker_at_a_time_and_does_not_oscillate(backend, a100):
    coeffs, kv = a100
    config = RebalanceConfig(interval_s=1.0, cooldown_s=0.0, confirm=2)
    rebalancer = Rebalancer(backend, coeffs, SLO, kv, config)

    async def phase(rate: float, load: tuple[int, int], evaluations: int) -> list[tuple[int, int]]:
        splits = []
        for _ in range(evaluations):
            script(backend, rate, *load)
            await rebalancer.step()
            splits.append(rebalancer.split())
        return splits

    async def main():
        await backend.refresh()
        quiet = await phase(1.0, PROMPT_HEAVY, 4)  # far below what 2:2 serves
        prompt_heavy = await phase(20.0, PROMPT_HEAVY, 8)
        decode_heavy = await phase(20.0, DECODE_HEAVY, 12)
        await backend.refresh()
        return quiet, prompt_heavy, decode_heavy, backend.stats()

    quiet, prompt_heavy, decode_heavy, stats = asyncio.run(main())
    assert quiet == [(2, 2)] * 4, "a load the split serves with room to spare moved a worker"
    assert [d.reason for d in rebalancer.decisions][:4] == ["the load is under 70% of the current split's capacity"] * 4
    # Prompt-heavy at 20 req/s: 3P:1D, after two agreeing evaluations, and then it stays.
    assert prompt_heavy == [(2, 2), (3, 1), *[(3, 1)] * 6]
    # Decode-heavy: towards 0P:4D, one worker per change (each after two agreeing evaluations).
    first = decode_heavy.index((0, 4))
    assert decode_heavy[:first] == sorted(decode_heavy[:first], reverse=True)
    assert {s[0] for s in decode_heavy[:first]} == {3, 2, 1}
    assert all(s == (0, 4) for s in decode_heavy[first:]) and first < len(decode_heavy) - 2
    changes = [d for d in rebalancer.decisions if d.action == "change"]
    assert len(changes) == len(rebalancer.changes) == 4 == backend.counters["role_changes_total"]
    assert all(d.best.capacity_rps >= 1.2 * d.current.capacity_rps for d in changes)
    assert stats["prefill_num_workers_up"] == 0 and stats["decode_num_workers_up"] == 4


def test_a_noisy_steady_load_and_the_cooldown_hold_the_split(backend, a100):
    """A load near the margin, jittered, never flips the split back and forth; after a change,
    the cool-down holds the next one."""
    coeffs, kv = a100
    rebalancer = Rebalancer(backend, coeffs, SLO, kv, RebalanceConfig(cooldown_s=600.0, confirm=1))
    rng = np.random.default_rng(1)

    async def main():
        await backend.refresh()
        splits = []
        for _ in range(10):
            script(backend, 20.0 * float(rng.uniform(0.9, 1.1)), int(2000 * rng.uniform(0.9, 1.1)), 50)
            await rebalancer.step()
            splits.append(rebalancer.split())
        return splits

    splits = asyncio.run(main())
    assert splits == [(3, 1)] * 10, "one change, and never back"
    assert "cooling down" not in rebalancer.decisions[0].reason
    assert all(d.action == "hold" for d in list(rebalancer.decisions)[1:])


def test_rebalance_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="interval_s"):
        RebalanceConfig(interval_s=0)
    with pytest.raises(ValueError, match="min_decode"):
        RebalanceConfig(min_decode=0)

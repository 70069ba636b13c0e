"""Online P:D rebalancing: the prefill:decode split follows the load.

A Rebalancer (tandem serve --autoscale) looks, every interval_s, at the requests that arrived
over the last window_s (DisaggregatedBackend.arrivals and .finished: arrival rate, its
burstiness, prompt lengths, and output lengths: what a finished request generated, the
max_tokens of one still running) and asks the planner's capacity model
(planner/solve/capacity.py, the one `tandem plan` sizes instances with) what each split of
the workers it has would serve within the SLO:

  p prefill + d decode   min(p x prefill_capacity(pool of p), d x decode_limits().capacity)
  0 prefill + n decode   every worker prefills its own prompts (colocated): a rate r where
                         the share of time prefilling, f = r x E[prefill s], leaves decode a
                         capacity (1 - f) x decode_limits() under a TPOT target tightened to
                         (1 - f) x tpot (prefill chunks share the decode steps), and each
                         prompt's chunks wait for the decode batch stepped with them (TTFT)

It changes one worker's role at a time (change_role: drain it, switch its engine's shell,
route to it in its new role; no model reload) when all of these hold, and otherwise holds:
  - the best split forecasts at least (1 + margin) x the capacity of the current one;
  - the load is at least `pressure` x the current split's capacity (a split with room to
    spare is left alone, whatever the mix);
  - `confirm` evaluations in a row called for a change to the same split;
  - cooldown_s passed since the last change.
A change back needs the workload itself to move by the margin: no oscillation on a steady
load. Every evaluation is logged with its figures and kept (decisions), every change is
counted in the backend's metrics (role_changes_total; the rebalance_* gauges).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from planner.latency.roofline import Coefficients
from planner.solve.capacity import (
    MIN_PREFILL_BUDGET,
    WorkloadStats,
    decode_limits,
    prefill_capacity,
    prefill_service_s,
)
from proto.serving import Role
from proto.slo import SLOSpec
from router.backend import DRAIN_TIMEOUT_S
from router.orchestrator import DisaggregatedBackend

log = logging.getLogger(__name__)
DECISIONS_KEPT = 1000
MAX_SAMPLES = 300  # finished requests the workload's lengths are drawn from, at most
STALL_DRAWS = 8  # draws per request of the prompts that stall it (colocated_capacity)


@dataclass(frozen=True)
class RoleChange:
    """A worker that changed role (change_role)."""

    before: tuple[Role, int]  # (role, index) it had
    after: tuple[Role, int]  # and has now
    moved: int  # requests its drain moved off it
    drain_s: float
    switch_s: float  # the role change on the worker itself (no model reload)


async def change_role(
    backend: DisaggregatedBackend, role: Role | str, index: int, timeout_s: float = DRAIN_TIMEOUT_S
) -> RoleChange:
    """Drain a worker that can change role (elastic/role_actor.py), switch it to the other role
    and route to it there. ValueError naming what is wrong (no such worker, one that cannot
    change role, the last decode worker); a switch that fails leaves it in its old role."""
    client = backend.client(role, index)
    role = Role(str(role))
    set_role = getattr(client, "set_role", None)
    if set_role is None:
        raise ValueError(
            f"{role.value} worker {index} cannot change role: start workers that can (tandem serve --autoscale)"
        )
    new = Role.DECODE if role is Role.PREFILL else Role.PREFILL
    started = time.monotonic()
    try:
        moved = await backend.drain(role, index, timeout_s)
        backend.retire(role, index)  # not polled while it switches
    except BaseException:
        backend.counters["role_change_failures_total"] += 1
        backend.undrain(role, index)
        raise
    drained = time.monotonic()
    try:
        switch_s = await set_role(new)
    except BaseException:
        backend.counters["role_change_failures_total"] += 1
        backend.add_worker(role, client)  # back where it was
        raise
    new_index = backend.add_worker(new, client)
    backend.counters["role_changes_total"] += 1
    change = RoleChange((role, index), (new, new_index), moved, drained - started, switch_s)
    log.info(
        "%s worker %d is now %s worker %d (%d requests moved off it in %.2f s, switched in %.3f s)",
        role.value,
        index,
        new.value,
        new_index,
        moved,
        change.drain_s,
        switch_s,
    )
    return change


@dataclass(frozen=True)
class Split:
    """A prefill:decode split and what the capacity model forecasts it serves within the SLO."""

    prefill: int
    decode: int
    capacity_rps: float

    def __str__(self) -> str:
        return f"{self.prefill}P:{self.decode}D ({self.capacity_rps:.2f} req/s)"


def colocated_capacity(
    coeffs: Coefficients, stats: WorkloadStats, slo: SLOSpec, kv_tokens: int, block_size: int, workers: int
) -> float:
    """Requests/s `workers` workers that each prefill their own prompts serve within the SLO
    (see the module's note)."""
    prefill_s = float(prefill_service_s(coeffs, stats).mean())
    steps = np.maximum(stats.output_tokens - 1, 1).astype(float)
    draws = np.random.default_rng(0).random((STALL_DRAWS, len(steps)))  # common numbers: a smooth bisection

    def decode_feasible(rate: float) -> bool:
        share = rate / workers * prefill_s
        if share >= 1:
            return False
        tighter = SLOSpec(slo.ttft_s, slo.tpot_s * (1 - share), slo.ttft_percentile, slo.tpot_percentile)
        if rate / workers > (1 - share) * decode_limits(coeffs, kv_tokens, stats, tighter, block_size).capacity_rps:
            return False
        # A request's TPOT is its steps' time plus the prompts prefilled while it decodes, spread
        # over its tokens: a short output hit by one long prompt misses the target. Prompts
        # arrive at the worker's rate over the request's life (decode steps x TPOT): Poisson.
        batch = rate / workers * stats.mean_decode_steps * slo.tpot_s
        step_s = coeffs.decode_ms(batch, batch * stats.decode_context) / 1e3
        stalls = _poisson_quantiles(draws, rate / workers * steps * slo.tpot_s)
        tpot = step_s + stalls * prefill_s / steps
        return float(np.quantile(tpot, slo.tpot_percentile / 100)) <= slo.tpot_s

    def ttft_capacity(rate: float) -> float:
        """What the prefills allow when a prompt's chunks (MIN_PREFILL_BUDGET tokens each) ride
        on steps that also run the decode batch `rate` builds up (Little: rate x decode steps
        x TPOT sequences); it falls as the rate rises."""
        batch = rate / workers * stats.mean_decode_steps * slo.tpot_s
        per_token = coeffs.decode_ms(batch, batch * stats.decode_context) / MIN_PREFILL_BUDGET
        return workers * prefill_capacity(replace(coeffs, b=coeffs.b + per_token), stats, slo, pool_size=workers)

    lo, hi = 0.0, workers / prefill_s if prefill_s > 0 else 1e6
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if decode_feasible(mid) else (lo, mid)
    below = min(lo, ttft_capacity(lo))
    if below >= lo:
        return lo
    # ttft_capacity falls as the rate rises: the rate where they meet is between `below` and
    # what `below` allows.
    above = min(lo, ttft_capacity(below))
    for _ in range(4):
        mid = (below + above) / 2
        below, above = (mid, above) if ttft_capacity(mid) >= mid else (below, mid)
    return below


def _poisson_quantiles(u: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Poisson(mean) counts at the quantiles u (one row per draw, one column per mean)."""
    counts = np.zeros(u.shape)
    term = np.exp(-mean) * np.ones(u.shape)  # P(N = 0)
    cdf = term.copy()
    for k in range(1, 200):
        below = u > cdf
        if not below.any():
            break
        counts += below
        term = term * mean / k
        cdf = cdf + term
    return counts


def forecast_splits(
    workers: int,
    coeffs: Coefficients,
    stats: WorkloadStats,
    slo: SLOSpec,
    kv_tokens: int,
    block_size: int,
    min_prefill: int = 0,
    min_decode: int = 1,
) -> list[Split]:
    """Every split of `workers` identical workers (at least min_prefill / min_decode of each)."""
    decode_rps = decode_limits(coeffs, kv_tokens, stats, slo, block_size).capacity_rps
    splits = []
    for p in range(min_prefill, workers - min_decode + 1):
        d = workers - p
        if p == 0:
            capacity = colocated_capacity(coeffs, stats, slo, kv_tokens, block_size, d)
        else:
            capacity = min(p * prefill_capacity(coeffs, stats, slo, pool_size=p), d * decode_rps)
        splits.append(Split(p, d, capacity))
    return splits


def observed_workload(
    arrivals: list[tuple[float, int, int]], finished: list[tuple[float, int, int]], now: float, window_s: float
) -> tuple[float, WorkloadStats] | None:
    """(arrival rate, workload stats) of the requests that arrived in the last window_s; None
    with fewer than two. A finished request counts with the tokens it generated, one still
    running with its max_tokens: under overload the long outputs finish last, and lengths
    of finished requests alone would show a load lighter than the one arriving."""
    recent = [(t, p, m) for t, p, m in arrivals if t >= now - window_s]
    if len(recent) < 2:
        return None
    generated = {(t, p): o for t, p, o in finished if t >= now - window_s}
    times = np.array([t for t, _, _ in recent])
    span = min(window_s, now - float(times.min()))
    rate = len(times) / max(span, 1e-9)
    gaps = np.diff(np.sort(times))
    cv2 = float(gaps.var() / gaps.mean() ** 2) if len(gaps) > 1 and gaps.mean() > 0 else 1.0
    lengths = [(p, generated.get((t, p), m)) for t, p, m in recent]
    if len(lengths) > MAX_SAMPLES:  # the capacity model's cost grows with the samples
        picked = np.random.default_rng(0).choice(len(lengths), MAX_SAMPLES, replace=False)
        lengths = [lengths[i] for i in picked]
    prompts = np.array([p for p, _ in lengths])
    outputs = np.array([o for _, o in lengths])
    stats = WorkloadStats(prompts, outputs, int((prompts + outputs).max()), arrival_cv2=max(cv2, 0.05))
    return rate, stats


@dataclass(frozen=True)
class RebalanceConfig:
    interval_s: float = 5.0  # between evaluations
    window_s: float = 60.0  # of workload looked at
    cooldown_s: float = 30.0  # after a change, before the next
    margin: float = 0.2  # the best split must forecast this much more capacity than the current
    pressure: float = 0.7  # and the load be at least this share of the current split's capacity
    confirm: int = 2  # evaluations in a row that must call for the same change
    min_requests: int = 10  # requests arrived in the window before any decision
    min_prefill: int = 0  # 0: the workers may all decode, prefilling their own prompts
    min_decode: int = 1

    def __post_init__(self) -> None:
        for name in ("interval_s", "window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rebalance {name} must be > 0, got {getattr(self, name)}")
        if self.cooldown_s < 0 or self.margin < 0 or not 0 <= self.pressure or self.confirm < 1:
            raise ValueError("rebalance cooldown_s and margin must be >= 0, pressure >= 0 and confirm >= 1")
        if self.min_prefill < 0 or self.min_decode < 1:
            raise ValueError(
                f"rebalance min_prefill must be >= 0 and min_decode >= 1, got {self.min_prefill}, {self.min_decode}"
            )


@dataclass(frozen=True)
class Decision:
    """One evaluation: the workload seen, the current and the best split, and what was done."""

    at_s: float  # time.monotonic()
    rate_rps: float
    mean_prompt: float
    mean_output: float
    current: Split
    best: Split
    action: str  # "hold" or "change"
    reason: str


class Rebalancer:
    """Changes workers' roles as the load moves (see the module's note). Its workers must be
    able to change role (elastic/role_actor.py)."""

    def __init__(
        self,
        backend: DisaggregatedBackend,
        coeffs: Coefficients,
        slo: SLOSpec,
        kv_tokens: int | None = None,
        config: RebalanceConfig | None = None,
    ):
        """coeffs: the workers' latency (a `tandem profile` entry); kv_tokens: one worker's KV
        (None: from the decode workers' stats, once they report)."""
        self.backend, self.coeffs, self.slo, self.kv_tokens = backend, coeffs, slo, kv_tokens
        self.config = config or RebalanceConfig()
        self.decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self.changes: list[tuple[float, RoleChange]] = []  # (time.monotonic(), change)
        self._agreed: tuple[int, int] | None = None  # the best split of the evaluations in a row
        self._agreements = 0
        self._changed_at = -math.inf
        self._target: tuple[int, int] | None = None  # the split the changes under way lead to
        self._said: tuple | None = None  # the last decision logged at INFO
        self._task: asyncio.Task | None = None

    def split(self) -> tuple[int, int]:
        """The workers of each role now (retired indices aside)."""
        views = self.backend.policy
        return sum(not v.retired for v in views.prefill), sum(not v.retired for v in views.decode)

    def evaluate(
        self,
        now: float | None = None,
        arrivals: list[tuple[float, int, int]] | None = None,
        finished: list[tuple[float, int, int]] | None = None,
    ) -> Decision | None:
        """Look at the load and decide (nothing is changed here); None before min_requests
        arrived in the window. arrivals, finished: the backend's, copied (default: now)."""
        now = time.monotonic() if now is None else now
        arrivals = list(self.backend.arrivals) if arrivals is None else arrivals
        finished = list(self.backend.finished) if finished is None else finished
        seen = observed_workload(arrivals, finished, now, self.config.window_s)
        if seen is None or len(seen[1].input_tokens) < self.config.min_requests:
            return None
        rate, stats = seen
        prefill, decode = self.split()
        cfg = self.config
        kv_tokens = self.kv_tokens or self.backend.policy.block_size * max(
            (v.stats.num_blocks for v in self.backend.policy.decode if v.stats is not None), default=0
        )
        if not kv_tokens:
            return None
        splits = forecast_splits(
            prefill + decode,
            self.coeffs,
            stats,
            self.slo,
            kv_tokens,
            self.backend.policy.block_size,
            min(cfg.min_prefill, prefill),
            min(cfg.min_decode, decode),
        )
        current = next(s for s in splits if s.prefill == prefill)
        best = max(splits, key=lambda s: (s.capacity_rps, s.prefill == prefill))
        if self._target == (prefill, decode):
            self._target = None  # reached
        target = next((s for s in splits if (s.prefill, s.decode) == self._target), None)
        if target is not None and best.capacity_rps < (1 + cfg.margin) * target.capacity_rps:
            # On the way to a split, one worker at a time: the splits between may forecast less
            # (they are not compared with the one the change started from), so the way goes on
            # unless another split beats the target by the margin.
            best = target
        if best.prefill == prefill:
            action, reason = "hold", "the current split is the best"
        elif best.capacity_rps < (1 + cfg.margin) * current.capacity_rps:
            action, reason = "hold", f"the best split is less than {cfg.margin:.0%} better"
        elif rate < cfg.pressure * current.capacity_rps:
            action, reason = "hold", f"the load is under {cfg.pressure:.0%} of the current split's capacity"
        else:
            action, reason = "change", ""
        # Evaluations in a row that called for a change to this same split.
        key = (best.prefill, best.decode) if action == "change" else None
        self._agreements = self._agreements + 1 if key is not None and key == self._agreed else int(key is not None)
        self._agreed = key
        if action == "hold":
            pass
        elif self._agreements < cfg.confirm:
            action, reason = "hold", f"the best split came out {self._agreements} of {cfg.confirm} times in a row"
        elif now - self._changed_at < cfg.cooldown_s:
            action, reason = "hold", f"cooling down ({cfg.cooldown_s:g} s after the last change)"
        else:
            action, reason = (
                "change",
                f"{best} forecasts {best.capacity_rps / max(current.capacity_rps, 1e-9):.2f}x {current}",
            )
        decision = Decision(
            now,
            rate,
            float(stats.input_tokens.mean()),
            float(stats.output_tokens.mean()),
            current,
            best,
            action,
            reason,
        )
        self.decisions.append(decision)
        counters = self.backend.counters
        counters["rebalance_rate_rps"] = rate
        counters["rebalance_best_prefill_workers"] = best.prefill
        counters["rebalance_forecast_capacity_rps"] = current.capacity_rps
        # A decision like the last one (same action, best split and reason) at DEBUG: a steady
        # load would fill the log.
        said = (action, (best.prefill, best.decode), reason.split(" forecasts ")[0])
        level = logging.DEBUG if said == self._said else logging.INFO
        self._said = said
        log.log(
            level,
            "rebalance: %.2f req/s, prompt %.0f, output %.0f tokens: now %s, best %s: %s (%s)",
            rate,
            decision.mean_prompt,
            decision.mean_output,
            current,
            best,
            action,
            reason,
        )
        return decision

    async def step(self) -> RoleChange | None:
        """One evaluation, and the role change it calls for (one worker toward the best split)."""
        # The forecasts take a fraction of a second: off the router's event loop.
        snapshot = (time.monotonic(), list(self.backend.arrivals), list(self.backend.finished))
        decision = await asyncio.to_thread(self.evaluate, *snapshot)
        if decision is None or decision.action != "change":
            return None
        to_prefill = decision.best.prefill > decision.current.prefill
        role = Role.DECODE if to_prefill else Role.PREFILL
        views = self.backend.policy.decode if to_prefill else self.backend.policy.prefill
        candidates = [v for v in views if v.serving]
        if not candidates:
            return None
        worker = min(candidates, key=lambda v: v.load)  # the fewest requests to move
        self._changed_at = time.monotonic()
        self._agreements = 0
        self._target = (decision.best.prefill, decision.best.decode)
        try:
            change = await change_role(self.backend, role, worker.index)
        finally:
            self._changed_at = time.monotonic()  # the cool-down runs from the change's end
        self.changes.append((time.monotonic(), change))
        return change

    async def run(self) -> None:
        """Evaluate every interval_s until cancelled; a change that fails is logged, not fatal."""
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next evaluation tries again
                log.warning("rebalance: the evaluation or its role change failed: %r", exc)

    def start(self) -> None:
        """Run on the current event loop (the router's)."""
        self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

"""Disaggregated serving behind the Backend interface: the request's way, in one function.

    generate(request):
      1. pick a decode worker (free KV blocks, batch load)
      2. short uncached prompt -> the decode worker prefills it itself (conditional
         disaggregation), else:
         a. decode.reserve(request)           -> KVHandle (blocks registered, KV endpoints)
         b. prefill.prefill(request, handle)  -> first token; KV pushed layer by layer
         c. decode.admit(first token)         -> waits for the KV, joins the running batch
      3. stream decode's deltas to the caller
      a cancel, disconnect or failure at any step -> abort on both workers (blocks freed)

    A worker lost on the way (dead, broken, a KV transfer that failed) does not end the
    request: it runs again on workers that are up, resumed after the tokens the caller has
    (proto.serving.Resume: a decode worker prefills prompt + those tokens and goes on), so
    the caller sees one stream with no gap and no repeat. With no prefill worker up, decode
    workers prefill every prompt themselves (degraded); with no decode worker up, a request
    waits up to recovery_wait_s for one to come back (Ray restarts dead workers).

    Live migration, draining and shedding under KV pressure (router/moving.py) move a run to
    another decode worker with its KV, or stop it there and resume it elsewhere; the run's
    next attempt here carries out the move.

    change_role(role, index) (router/rebalance.py) drains a worker that can change role
    (elastic/role_actor.py), switches it, and routes to it in its new role: retire() takes it
    out of its old role's list, add_worker() into the new one's. A worker keeps its index in
    each role's list for the backend's life (a retired index stays, never routed to).

Workers are reached through typed clients (router/clients.py); this module knows nothing of
what carries the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from engine.tokenizer import load_tokenizer
from proto.errors import Overloaded, Unavailable, WorkerLost
from proto.serving import (
    DETACHED,
    FinishReason,
    GenerateRequest,
    Resume,
    Role,
    TokenDelta,
    WorkerStats,
    final_delta,
)
from router.backend import STATS_INTERVAL_S, Migration, WorkerStatus, WorkerSteps
from router.clients import DecodeClient, PrefillClient
from router.moving import Migrate, MigrationFailed, MigrationInFlight, Moved, Mover, Reattach, Run
from router.policy import RoutingPolicy, WorkerView

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
WORKER_STATS_TIMEOUT_S = 2.0
RECOVERIES = 3  # times a request is run again after losing a worker, at most
RECOVERY_WAIT_S = 60.0  # how long a request waits for a decode worker to be up again
RECOVERY_POLL_S = 0.5
MIGRATIONS_KEPT = 1000
WORKLOAD_KEPT = 20_000  # arrivals and finished requests remembered for the rebalancer
# Sums the backend reports per role (over the workers that are up).
SUMMED = (
    "num_waiting",
    "num_running",
    "num_reserved",
    "num_held",
    "num_transfers",
    "num_free_blocks",
    "num_blocks",
    "num_preemptions",
)


class DisaggregatedBackend(Mover):
    def __init__(
        self,
        model_dir: str | Path,
        prefill: Sequence[PrefillClient],
        decode: Sequence[DecodeClient],
        *,
        model_name: str,
        max_model_len: int,
        block_size: int,
        kv_bytes_per_token: int,
        policy: str = "load",
        local_prefill_tokens: int = 32,
        recovery_wait_s: float = RECOVERY_WAIT_S,
        migrate_on_drain: bool = True,
        migrate_on_pressure: bool = True,
    ):
        """migrate_on_drain: drain() moves decoding requests with their KV (live migration);
        False resumes every one elsewhere instead, recomputing its KV there.
        migrate_on_pressure: a decode worker short of KV blocks sheds running requests to one
        with room (router/policy.py pick_shed) instead of preempting them."""
        if not decode:
            raise ValueError("at least one decode worker is needed")
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.kv_bytes_per_token = kv_bytes_per_token
        self.local_prefill_tokens = local_prefill_tokens
        self.recovery_wait_s = recovery_wait_s
        self.migrate_on_drain = migrate_on_drain
        self.migrate_on_pressure = migrate_on_pressure
        self._shedding: asyncio.Future[None] | None = None  # the pressure migration in flight
        self._shed_after = 0.0  # time.monotonic() before which no other starts
        self._attempts: dict[str, str] = {}  # request id -> the id of its current run again
        self._runs: dict[str, Run] = {}  # run id -> the workers it is on
        self._moving: set[str] = set()  # runs drain() stopped, to be resumed elsewhere
        self._tokenizer = load_tokenizer(model_dir)
        self.prefill = list(prefill)
        self.decode = list(decode)
        self.policy = RoutingPolicy(policy, len(self.prefill), len(self.decode), block_size)
        self._stats_at = 0.0
        self._fetching: asyncio.Future[None] | None = None  # the stats fetch in flight
        self._fetched = False  # some fetch has ended: the policy has stats to go by
        self.counters = {
            "kv_transfers_total": 0,
            "kv_transfer_failures_total": 0,
            "kv_transfer_bytes_total": 0,
            "kv_transfer_seconds_total": 0.0,
            "local_prefills_total": 0,
            "degraded_prefills_total": 0,  # prefilled on a decode worker because no prefill worker was up
            "recoveries_total": 0,  # runs again after a lost worker
            "recovery_failures_total": 0,  # requests that ended with an error after every recovery
            "moves_total": 0,  # runs moved off a draining worker by resuming them on another
            "migrations_total": 0,  # runs live-migrated to another decode worker with their KV
            "migration_failures_total": 0,  # migrations that failed (the run went on where it was)
            "migration_pause_seconds_total": 0.0,  # summed: detach to the first token after it
            "pressure_migrations_total": 0,  # migrations started because a decode worker ran short of KV
            "role_changes_total": 0,  # workers that changed role (router/rebalance.py)
            "role_change_failures_total": 0,
        }
        # What the rebalancer reads (router/rebalance.py): each request served, as (arrival
        # time, prompt tokens, max_tokens), and each finished one's (arrival time, prompt
        # tokens, output tokens).
        self.arrivals: deque[tuple[float, int, int]] = deque(maxlen=WORKLOAD_KEPT)
        self.finished: deque[tuple[float, int, int]] = deque(maxlen=WORKLOAD_KEPT)
        self._cancelled: set[str] = set()  # requests abort() ended: never run again
        self.migrations: deque[Migration] = deque(maxlen=MIGRATIONS_KEPT)  # the latest that landed, oldest first

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self._tokenizer

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        """Runs of the request until one ends it, each after the last one's tokens. A run again
        has an id of its own on the workers (`<id>#<k>`): what a lost run left there, or an
        abort of it still on its way, can never meet it."""
        arrived = time.monotonic()
        num_output, served = 0, False
        try:
            async for delta in self._recovering(request):
                if not served:  # a request refused (400, 429, 503) raised before: not load served
                    served = True
                    self.arrivals.append((arrived, len(request.prompt_token_ids), request.params.max_tokens))
                num_output += len(delta.token_ids)
                if delta.finished and delta.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                    self.finished.append((arrived, len(request.prompt_token_ids), num_output))
                yield delta
        finally:
            self._attempts.pop(request.request_id, None)
            self._cancelled.discard(request.request_id)

    async def _recovering(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        token_ids: list[int] = []  # what the caller has: the resume point if a run stops
        text: list[str] = []
        recoveries = 0
        how: Migrate | Reattach | None = None  # how the next run starts, if not from scratch
        try:
            for again in itertools.count():
                attempt = request
                if isinstance(how, Reattach):  # the run the migration left: the same id there
                    attempt = replace(request, request_id=how.run_id)
                elif again:
                    resume = Resume(tuple(token_ids), "".join(text)) if token_ids else None
                    attempt = replace(request, request_id=f"{request.request_id}#{again}", resume=resume)
                self._attempts[request.request_id] = attempt.request_id
                if again and request.request_id in self._cancelled:
                    yield final_delta(request.request_id, FinishReason.ABORT)
                    return
                try:
                    async with contextlib.aclosing(self._run(attempt, wait=again > 0, how=how)) as run:
                        how = None
                        async for delta in run:
                            token_ids.extend(delta.token_ids)
                            text.append(delta.text)
                            yield delta if not again else replace(delta, request_id=request.request_id)
                    return
                except (ValueError, Overloaded, Unavailable) as exc:
                    if again == 0:
                        raise  # nothing streamed yet: the frontends answer 400, 429 or 503
                    # A run again that no worker takes: the stream has started, so it ends here.
                    self.counters["recovery_failures_total"] += 1
                    why = f"lost its worker, and could not run again: {exc}"
                    retryable = not isinstance(exc, ValueError)
                    yield final_delta(request.request_id, FinishReason.ERROR, why, retryable=retryable)
                    return
                except Moved:
                    self.counters["moves_total"] += 1
                except Migrate as migrate:
                    how = migrate
                except MigrationFailed as failed:
                    how = Reattach(failed.source.run_id, failed.source.src)
                except _Lost as lost:
                    # The workers' health is looked at now, not at the next interval.
                    self._stats_at = 0.0
                    if recoveries == RECOVERIES:
                        self.counters["recovery_failures_total"] += 1
                        why = f"{lost} (after {RECOVERIES} recoveries)"
                        yield final_delta(request.request_id, FinishReason.ERROR, why, retryable=True)
                        return
                    recoveries += 1
                    self.counters["recoveries_total"] += 1
                    log.warning(
                        "request %s lost its worker after %d tokens (%s): running it again",
                        request.request_id,
                        len(token_ids),
                        lost,
                    )
        finally:
            if isinstance(how, Migrate):  # it ended before the migration's run started
                how.migration.fail("the request ended before it migrated")
                await self.decode[how.src].abort(how.run_id)  # what the source still holds

    async def _run(
        self, request: GenerateRequest, wait: bool, how: Migrate | Reattach | None = None
    ) -> AsyncGenerator[TokenDelta, None]:
        """One run of a request on the workers; _Lost when a worker failed it (blocks freed).
        wait: a recovery, which waits up to recovery_wait_s for a decode worker to be up.
        how: the run is a migration's (its KV copied from how.src; MigrationFailed if that
        fails), or goes on where a failed migration left it (Reattach)."""
        request_id, token_ids = request.request_id, list(request.prompt_token_ids)
        hashes = self.policy.hashes(token_ids)
        if how is None:
            decode_view = await self._pick_decode(hashes, wait)
        else:
            decode_view = self.policy.decode[how.migration.dst if isinstance(how, Migrate) else how.src]
        decode = self.decode[decode_view.index]
        run = self._runs[request_id] = Run(decode_view.index)  # at once: drain() must see it
        prefill = None
        current = decode_view  # the worker the call in flight goes to
        transfer_start: float | None = None  # set while the first delta after a transfer is awaited
        streaming = False  # a delta came: a transfer, if any, is done
        finished = False  # the request ended on the workers: nothing left to abort
        detached = False  # it left this worker to migrate: what it holds there stays
        try:
            uncached = len(token_ids) - decode_view.overlap_blocks(hashes) * self.policy.block_size
            prefill_up = any(v.serving for v in self.policy.prefill)
            if isinstance(how, Migrate):
                stream = await self._migrated(request, run, how, decode)
            elif isinstance(how, Reattach):
                stream = decode.reattach(request_id)
            elif request.resume is not None or not prefill_up or uncached <= self.local_prefill_tokens:
                self.counters["local_prefills_total"] += 1
                if any(not v.retired for v in self.policy.prefill) and not prefill_up and request.resume is None:
                    self.counters["degraded_prefills_total"] += 1
                stream = decode.generate(request)
            else:
                prefill_view = self.policy.pick_prefill(hashes)
                prefill = self.prefill[prefill_view.index]
                run.prefill = prefill_view.index
                # Waits in the decode worker's queue until it has a batch slot and blocks.
                handle = await decode.reserve(request)
                current = prefill_view
                result = await prefill.prefill(request, handle)
                run.prefill = None
                current = decode_view
                prefill_view.remember(hashes)
                stream = decode.admit(request_id, result.first_token_id)
                transfer_start = time.monotonic()
            decode_view.remember(hashes)
            num_tokens = len(token_ids) + len(request.resume.token_ids if request.resume else ())
            async for delta in stream:
                streaming = True
                num_tokens += len(delta.token_ids)
                run.num_tokens = num_tokens
                if transfer_start is not None:
                    self._count_transfer(len(token_ids), time.monotonic() - transfer_start)
                    transfer_start = None
                if isinstance(how, Migrate) and not how.migration.done.done():
                    self._migration_landed(request, how)
                if delta.finish_reason is FinishReason.ABORT:
                    migrating = run.migration is not None and delta.error == DETACHED
                    if migrating or request_id in self._moving:
                        if delta.token_ids or delta.text:  # the last tokens, joined with the stop
                            yield replace(delta, finished=False, finish_reason=None, error=None)
                        if migrating:  # migrate() took it out of the batch
                            detached = True
                            raise Migrate(cast(MigrationInFlight, run.migration), run.decode, request_id)
                        raise Moved()  # drain() stopped it there
                if delta.finish_reason is FinishReason.ERROR and delta.retryable:
                    raise _Lost(delta.error or "the worker failed the request")  # a broken engine
                finished = delta.finished
                yield delta
        except (ValueError, Overloaded) as exc:
            if isinstance(how, Reattach) and not streaming:  # e.g. its source let it go meanwhile
                raise _Lost(f"could not go on where it was: {exc}") from exc
            raise  # the caller's fault or admission control: the frontends map these
        except (Unavailable, RuntimeError) as exc:
            if request_id in self._moving:
                raise Moved() from exc  # drain() stopped it before it streamed
            # A worker failed, broke or died: the request may succeed elsewhere.
            if prefill is not None and not streaming:
                self.counters["kv_transfer_failures_total"] += 1
            if isinstance(exc, WorkerLost):  # no request goes there until it answers again
                current.lost(time.monotonic())
            raise _Lost(str(exc)) from exc
        finally:
            try:
                if not finished and not detached:  # failed or cancelled anywhere: free what either worker holds
                    await decode.abort(request_id)
                    if prefill is not None:
                        await prefill.abort(request_id)
                if isinstance(how, Migrate) and run.source is not None:  # ended while its KV was copied
                    how.migration.fail("the request ended while its KV was copied")
                    await self.decode[how.src].abort(how.run_id)
            finally:  # after the aborts (drain() returns once they are sent), whatever they raise
                del self._runs[request_id]
                self._moving.discard(request_id)

    async def _pick_decode(self, hashes: list[bytes], wait: bool) -> WorkerView:
        """The decode worker for a run; with wait, polls up to recovery_wait_s for one to be up."""
        deadline = time.monotonic() + (self.recovery_wait_s if wait else 0.0)
        while True:
            await self._refresh_stats()
            try:
                return self.policy.pick_decode(hashes)  # Unavailable when no decode worker is up
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(RECOVERY_POLL_S)
            self._stats_at = 0.0

    async def wait_up(self, role: Role | str, index: int, timeout_s: float) -> None:
        """Wait until a worker answers its stats (e.g. after a restart); TimeoutError after timeout_s."""
        view = self._view(role, index)[1]
        deadline = time.monotonic() + timeout_s
        while True:
            await self.refresh()
            if view.alive:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{role} worker {index} is not up after {timeout_s:g} s")
            await asyncio.sleep(RECOVERY_POLL_S)

    async def take_steps(self) -> list[WorkerSteps]:
        views = self._views()
        taken = await asyncio.gather(
            *(asyncio.wait_for(client.take_steps(), WORKER_STATS_TIMEOUT_S) for _, _, client in views),
            return_exceptions=True,
        )
        return [
            WorkerSteps(role, view.index, steps)
            for (role, view, _), steps in zip(views, taken, strict=True)
            if not isinstance(steps, BaseException)
        ]

    def _view(self, role: Role | str, index: int) -> tuple[Role, WorkerView]:
        """A worker's view by role and index, or ValueError naming what exists."""
        roles = {r.value: r for r in (Role.PREFILL, Role.DECODE)}
        if str(role) not in roles:
            raise ValueError(f"role must be one of {sorted(roles)}, got {role!r}")
        views = self.policy.prefill if roles[str(role)] is Role.PREFILL else self.policy.decode
        members = [v.index for v in views if not v.retired]
        if not 0 <= index < len(views) or views[index].retired:
            raise ValueError(f"there is no {role} worker {index}: its indices are {members}")
        return roles[str(role)], views[index]

    def client(self, role: Role | str, index: int) -> PrefillClient | DecodeClient:
        """The client of a worker (ValueError naming what exists)."""
        role, view = self._view(role, index)
        return (self.prefill if role is Role.PREFILL else self.decode)[view.index]

    def retire(self, role: Role | str, index: int) -> None:
        """Take a drained worker out of its role for good (a role change, a scale-down): it is
        routed to, asked and counted no more; its index is never reused by another worker."""
        role, view = self._view(role, index)
        if any(run.on(role, index) for run in self._runs.values()):
            raise ValueError(f"{role.value} worker {index} still has requests: drain it first")
        view.retired, view.draining, view.stats, view.alive = True, False, None, False

    def add_worker(self, role: Role | str, client: PrefillClient | DecodeClient) -> int:
        """Route to a worker in `role` from now on; returns its index there: the index it had
        if it served this role before (it changed role and back), else a new one."""
        roles = {r.value: r for r in (Role.PREFILL, Role.DECODE)}
        if str(role) not in roles:
            raise ValueError(f"role must be one of {sorted(roles)}, got {role!r}")
        role = roles[str(role)]
        clients: list = self.prefill if role is Role.PREFILL else self.decode
        views = self.policy.prefill if role is Role.PREFILL else self.policy.decode
        index = next((i for i, c in enumerate(clients) if c is client), None)
        if index is None:
            index = len(clients)
            clients.append(client)
            views.append(WorkerView(index))
        elif not views[index].retired:
            raise ValueError(f"that worker is {role.value} worker {index} already")
        else:
            views[index] = WorkerView(index)  # what the router knew of it then is stale
        self._stats_at = 0.0  # its stats at the next request
        return index

    def _count_transfer(self, num_tokens: int, seconds: float) -> None:
        self.counters["kv_transfers_total"] += 1
        self.counters["kv_transfer_bytes_total"] += num_tokens * self.kv_bytes_per_token
        self.counters["kv_transfer_seconds_total"] += seconds

    async def abort(self, request_id: str) -> None:
        if request_id in self._attempts:
            self._cancelled.add(request_id)  # a run of it that stops now is not run again
        workers = {id(c): c for _, _, c in self._views()}.values()  # a worker once, whatever its roles
        ids = {request_id, self._attempts.get(request_id, request_id)}  # and its run again, if any
        await asyncio.gather(*(worker.abort(i) for worker in workers for i in ids))

    def _views(self) -> list[tuple[Role, WorkerView, PrefillClient | DecodeClient]]:
        """Every worker of each role (not the retired indices), with its client."""
        return [
            *((Role.PREFILL, v, c) for v, c in zip(self.policy.prefill, self.prefill, strict=True) if not v.retired),
            *((Role.DECODE, v, c) for v, c in zip(self.policy.decode, self.decode, strict=True) if not v.retired),
        ]

    async def _refresh_stats(self) -> None:
        """On a request's way: when the workers' stats are older than STATS_INTERVAL_S, fetch
        them in the background (a worker that hangs must not hold every request up for its
        stats timeout); only the first fetch, which the policy needs, is waited for."""
        if self._fetching is None or self._fetching.done():
            if time.monotonic() - self._stats_at < STATS_INTERVAL_S:
                return
            self._fetching = asyncio.ensure_future(self._fetch_stats())
        if not self._fetched:
            await asyncio.shield(self._fetching)

    async def _fetch_stats(self) -> None:
        self._stats_at = asked_at = time.monotonic()
        views = self._views()
        # A worker that misses WORKER_STATS_TIMEOUT_S MISSES_BEFORE_DOWN times in a row is as good as down.
        results = await asyncio.gather(
            *(asyncio.wait_for(client.stats(), WORKER_STATS_TIMEOUT_S) for _, _, client in views),
            return_exceptions=True,
        )
        for (_, view, _), result in zip(views, results, strict=True):
            # A worker that does not answer (dead) or whose engine broke (its stats() raises)
            # is down: no stats are made up for it.
            if isinstance(result, TimeoutError):
                view.timed_out()
            else:
                view.update(result if isinstance(result, WorkerStats) else None, asked_at)
        self._fetched = True
        self._shed_if_pressed()

    def is_ready(self) -> bool:
        """A decode worker answered its last stats call (at most STATS_INTERVAL_S ago while
        served): requests are served, prefilled on the decode workers if no prefill worker is up."""
        return any(view.serving for view in self.policy.decode)

    def workers(self) -> list[WorkerStatus]:
        return [
            WorkerStatus(role, view.index, view.alive, view.stats, view.draining) for role, view, _ in self._views()
        ]

    def stats(self) -> dict[str, float]:
        """Sums over the workers that are up (prefill_* and decode_*), KV usage of the live
        decode pool, counters."""
        out: dict[str, float] = dict(self.counters)
        for role in (Role.PREFILL, Role.DECODE):
            live = [v.stats for r, v, _ in self._views() if r is role and v.alive and v.stats is not None]
            out[f"{role.value}_num_workers_up"] = len(live)
            for key in SUMMED:
                out[f"{role.value}_{key}"] = sum(getattr(s, key) for s in live)
        out["num_waiting"] = out["prefill_num_waiting"] + out["decode_num_waiting"]
        out["num_running"] = out["decode_num_running"]
        out["num_free_blocks"] = out["decode_num_free_blocks"]
        out["num_blocks"] = out["decode_num_blocks"]
        out["kv_usage"] = 1.0 - out["num_free_blocks"] / out["num_blocks"] if out["num_blocks"] else 0.0
        return out

    async def refresh(self) -> None:
        """Fetch every worker's stats now, and wait for them (tests, /metrics scrapes, the
        server's watcher)."""
        if self._fetching is not None and not self._fetching.done():
            await asyncio.shield(self._fetching)  # asked before now: fetch again
        self._fetching = asyncio.ensure_future(self._fetch_stats())
        await asyncio.shield(self._fetching)


class _Lost(Exception):
    """A run of a request failed because of a worker (not the request): run it again."""

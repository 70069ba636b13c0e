"""Moving requests between workers, for the disaggregated backend (router/orchestrator.py).

migrate(request_id) moves a decoding request to another decode worker with its KV (live
migration, Llumnix-style):
  1. source.detach(run)                 -> it leaves the batch there, blocks kept; its
                                           stream ends after the last token it got
  2. dest.reserve(request + Resume)     -> blocks for the prompt and the tokens so far
  3. source.migrate_out(run, handle)    -> the KV copied through the same transports as a
                                           prefill's; the source frees it once confirmed
  4. dest.admit(run', newest token)     -> the stream goes on from the next token
A migration that fails (the destination full or lost, the copy broken) aborts what the
destination holds and reattaches the request on its source, where it goes on as it was.
Step 1 is migrate()'s; steps 2-4 run in the request's next run (the orchestrator's _run,
through _migrated()).

drain(role, index) takes a worker out of routing and moves every request off it: each run
decoding on a draining decode worker migrates (its KV copied); one that cannot (still
waiting or prefilling there, or its migration failed) is stopped there and resumed on
another decode worker after the tokens the caller has. It returns once nothing is left on
the worker: for scale-down, role changes and rolling restarts (deploy/cluster.py
restart_worker). undrain() puts it back.

Under KV pressure (migrate_on_pressure) a decode worker short of blocks sheds a running
request to one with room (router/policy.py pick_shed) instead of preempting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from proto.errors import Overloaded, Unavailable
from proto.serving import Detached, GenerateRequest, Role, TokenDelta
from router.backend import DRAIN_TIMEOUT_S, Migration
from router.clients import DecodeClient
from router.policy import RoutingPolicy, Running, WorkerView, pick_shed

log = logging.getLogger(__name__)
SHED_COOLDOWN_S = 1.0  # after a pressure migration starts, before the next may
MIGRATION_RESERVE_TIMEOUT_S = 5.0  # a migrating request waits this long for room on its destination
DRAIN_POLL_S = 0.05


@dataclass
class MigrationInFlight:
    """A migration under way, shared by migrate() and the runs that carry it out."""

    request_id: str
    dst: int  # the decode worker it goes to
    asked_s: float  # time.monotonic() when the detach was asked
    detached: asyncio.Future[Detached]  # the source's answer to the detach
    done: asyncio.Future[Migration]  # once it streams on dst; RuntimeError if it failed
    copy_s: float = 0.0

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))
            self.done.exception()  # retrieved: nobody need be waiting for it


@dataclass
class Run:
    """A run in flight, and the workers it is on (drain() looks for them)."""

    decode: int
    prefill: int | None = None  # while its prompt is being prefilled there
    source: int | None = None  # while its KV is copied from this decode worker (a migration)
    migration: MigrationInFlight | None = None  # while it is being detached to migrate
    num_tokens: int = 0  # prompt and tokens so far, once it streams (0 before)

    def on(self, role: Role, index: int) -> bool:
        if role is Role.DECODE:
            going = self.migration.dst if self.migration is not None else None
            return index in (self.decode, self.source, going)
        return self.prefill == index

    def movable_from(self, index: int) -> bool:
        """On decode worker `index` and not moving already."""
        return self.decode == index and self.source is None and self.migration is None


@dataclass(frozen=True)
class Reattach:
    """How a run goes on after its migration failed: where it was, under the same id."""

    run_id: str
    src: int


class Migrate(Exception):
    """A run was detached from its decode worker to migrate: the next run copies its KV."""

    def __init__(self, migration: MigrationInFlight, src: int, run_id: str):
        super().__init__(f"{run_id} migrates from decode worker {src} to {migration.dst}")
        self.migration, self.src, self.run_id = migration, src, run_id


class MigrationFailed(Exception):
    """A migration failed after the detach: the request is still whole on its source."""

    def __init__(self, source: Migrate):
        super().__init__(f"{source.run_id} did not migrate")
        self.source = source


class Moved(Exception):
    """drain() stopped a run on its worker: resume it elsewhere (not a failure)."""


class Mover:
    """Migration, draining and shedding: the part of DisaggregatedBackend that moves runs
    between workers. It keeps the backend's state below; the backend sets it up."""

    policy: RoutingPolicy
    decode: list[DecodeClient]
    counters: dict[str, float]
    migrations: deque[Migration]
    migrate_on_drain: bool
    migrate_on_pressure: bool
    _attempts: dict[str, str]  # request id -> the id of its current run again
    _runs: dict[str, Run]  # run id -> the workers it is on
    _moving: set[str]  # runs drain() stopped, to be resumed elsewhere
    _shedding: asyncio.Future[None] | None  # the pressure migration in flight
    _shed_after: float  # time.monotonic() before which no other starts
    _refresh_stats: Callable[[], Awaitable[None]]
    _view: Callable[[Role | str, int], tuple[Role, WorkerView]]

    async def _migrated(
        self, request: GenerateRequest, run: Run, how: Migrate, decode: DecodeClient
    ) -> AsyncGenerator[TokenDelta, None]:
        """A migration's steps 2-4 (see migrate()): the stream on the destination. On failure
        the destination's part is undone and MigrationFailed raised: the source still holds
        the request, detached."""
        run.source = how.src  # drain() waits for the source too while the copy runs
        try:
            detached = await how.migration.detached
            assert request.resume is not None, "a migrated run resumes after the tokens streamed"
            expected = len(request.prompt_token_ids) + len(request.resume.token_ids)
            if detached.num_tokens != expected:
                raise RuntimeError(f"the source holds {detached.num_tokens} tokens, the caller has {expected}")
            # The request is paused: a destination with no room now is the wrong one.
            handle = await asyncio.wait_for(decode.reserve(request), MIGRATION_RESERVE_TIMEOUT_S)
            copy_started = time.monotonic()
            await self.decode[how.src].migrate_out(how.run_id, handle)
            how.migration.copy_s = time.monotonic() - copy_started
        except (ValueError, Overloaded, Unavailable, RuntimeError, TimeoutError) as exc:
            self.counters["migration_failures_total"] += 1
            how.migration.fail(f"migrating to decode worker {how.migration.dst} failed: {exc}")
            log.warning("request %s did not migrate (%s): it goes on where it was", request.request_id, exc)
            await decode.abort(request.request_id)
            raise MigrationFailed(how) from exc
        finally:
            run.source = None
        return decode.admit(request.request_id, request.resume.token_ids[-1])

    def _migration_landed(self, request: GenerateRequest, how: Migrate) -> None:
        """The first delta after a migration: the request streams again."""
        migration = how.migration
        pause_s = time.monotonic() - migration.asked_s
        self.counters["migrations_total"] += 1
        self.counters["migration_pause_seconds_total"] += pause_s
        num_tokens = len(request.prompt_token_ids) + len(request.resume.token_ids if request.resume else ())
        landed = Migration(migration.request_id, how.src, migration.dst, num_tokens, pause_s, migration.copy_s)
        self.migrations.append(landed)
        migration.done.set_result(landed)

    async def migrate(self, request_id: str, to: int | None = None) -> Migration:
        """Live-migrate a decoding request to decode worker `to` (default: the one with the most
        room), its KV copied; returns once it streams there. ValueError when it cannot start
        (not in flight, not decoding yet, already moving, no such worker), RuntimeError when
        it failed on the way: the request then goes on where it was."""
        run_id = self._attempts.get(request_id, request_id)
        run = self._runs.get(run_id)
        if run is None:
            raise ValueError(f"request {request_id!r} is not in flight")
        migration = await self._detach(request_id, run_id, run, to)
        return await asyncio.shield(migration.done)

    def _request_of(self, run_id: str) -> str:
        """The id the client knows a run's request by (a run again is `<id>#<k>`)."""
        return next((r for r, a in self._attempts.items() if a == run_id), run_id)

    async def _detach(self, request_id: str, run_id: str, run: Run, to: int | None) -> MigrationInFlight:
        """Step 1 of a migration: take the run out of its worker's batch. The run's stream then
        ends, and its next run (_run with Migrate) does the rest."""
        if run.migration is not None or run.source is not None or run_id in self._moving:
            raise ValueError(f"request {request_id!r} is moving already")
        if run.prefill is not None:
            raise ValueError(f"request {request_id!r} is still being prefilled")
        if to is None:
            await self._refresh_stats()
            dst = self.policy.pick_decode([], exclude=run.decode)  # Unavailable when none is up
        else:
            dst = self._view(Role.DECODE, to)[1]
            if to == run.decode or not dst.serving:
                why = "is where it runs" if to == run.decode else "is not taking requests"
                raise ValueError(f"cannot migrate {request_id!r} to decode worker {to}: it {why}")
        loop = asyncio.get_running_loop()
        migration = MigrationInFlight(
            request_id, dst.index, time.monotonic(), loop.create_future(), loop.create_future()
        )
        run.migration = migration
        try:
            detached = await self.decode[run.decode].detach(run_id)
        except BaseException:
            run.migration = None
            raise
        migration.detached.set_result(detached)
        return migration

    async def drain(self, role: Role | str, index: int, timeout_s: float = DRAIN_TIMEOUT_S) -> int:
        """Take a worker out of routing and move every request off it; returns how many runs
        moved once none is left on it (TimeoutError after timeout_s, still draining). Runs
        decoding on a decode worker migrate with their KV; those that cannot (waiting or
        prefilling there, or their migration failed) are stopped there and resumed on another
        decode worker after the tokens their callers have (no loss, no repeat either way); a
        prefill worker's are left to finish (a prefill is short). The last decode worker that
        takes requests cannot be drained."""
        role, view = self._view(role, index)
        if role is Role.DECODE and not any(v.serving for v in self.policy.decode if v is not view):
            raise ValueError(f"draining decode worker {index} would leave no decode worker taking requests")
        view.draining = True
        moved = 0
        tried: set[str] = set()  # runs whose migration was tried: resumed if still here
        deadline = time.monotonic() + timeout_s
        while on_it := [rid for rid, run in self._runs.items() if run.on(role, index)]:
            if role is Role.DECODE:
                to_move = [rid for rid in on_it if self._runs[rid].movable_from(index) and rid not in self._moving]
                moved += len(to_move)
                await asyncio.gather(*(self._move_off(rid, index, tried) for rid in to_move))
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{role.value} worker {index} still has {len(on_it)} requests after {timeout_s:g} s")
            await asyncio.sleep(DRAIN_POLL_S)
        log.info("%s worker %d drained: %d requests moved", role.value, index, moved)
        return moved

    async def _move_off(self, run_id: str, index: int, tried: set[str]) -> None:
        """Move a run off a draining decode worker: migrate it, else resume it elsewhere."""
        run = self._runs.get(run_id)
        if run is None or not run.movable_from(index):
            return
        if self.migrate_on_drain and run_id not in tried and run.prefill is None:
            tried.add(run_id)
            with contextlib.suppress(ValueError, Unavailable, RuntimeError):  # not decoding, or no room
                await self._detach(self._request_of(run_id), run_id, run, None)
                return
        self._moving.add(run_id)
        await self.decode[index].abort(run_id)

    def undrain(self, role: Role | str, index: int) -> None:
        """Route requests to a drained worker again."""
        self._view(role, index)[1].draining = False

    def _shed_if_pressed(self) -> None:
        """After fresh stats: if a decode worker is short of KV blocks and another has room,
        start migrating a running request there (one at a time, SHED_COOLDOWN_S apart)."""
        if not self.migrate_on_pressure or time.monotonic() < self._shed_after:
            return
        if self._shedding is not None and not self._shedding.done():
            return
        running = [
            Running(rid, run.decode, run.num_tokens)
            for rid, run in self._runs.items()
            if run.num_tokens and run.movable_from(run.decode) and run.prefill is None and rid not in self._moving
        ]
        choice = pick_shed(self.policy.decode, running, self.policy.block_size)
        if choice is None:
            return
        self._shed_after = time.monotonic() + SHED_COOLDOWN_S
        self._shedding = asyncio.ensure_future(self._shed(*choice))

    async def _shed(self, chosen: Running, dst: int) -> None:
        run = self._runs.get(chosen.run_id)
        if run is None or not run.movable_from(chosen.decode):
            return
        request_id = self._request_of(chosen.run_id)
        stats = self.policy.decode[chosen.decode].stats
        log.info(
            "decode worker %d is short of KV blocks (%.0f%% used%s): migrating %s (%d tokens) to decode worker %d",
            chosen.decode,
            100 * (stats.kv_usage if stats else 0.0),
            ", preempting" if self.policy.decode[chosen.decode].preempting else "",
            request_id,
            chosen.num_tokens,
            dst,
        )
        self.counters["pressure_migrations_total"] += 1
        try:
            migration = await self._detach(request_id, chosen.run_id, run, dst)
            await asyncio.shield(migration.done)
        except (ValueError, Unavailable, RuntimeError) as exc:  # it ended or failed: it goes on where it was
            log.info("migrating %s off decode worker %d did not happen: %s", request_id, chosen.decode, exc)

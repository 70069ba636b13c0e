"""Runs an LLMEngine on its own thread so that asyncio servers and actors can drive it.

Callers submit, reserve, admit and abort from any thread; the loop thread steps the engine
whenever it has work and hands each request's outputs to that request's callback. Calls
and steps are serialised by one lock, so the engine itself stays single-threaded. KV
transfer threads never wait for a step: release_soon() only queues the request id.

Admission queues rather than refuses: submitted requests wait in the scheduler and
reservations (decode side) in a FIFO here, until the batch and the cache have room; only
when max_waiting requests already wait is a new one refused (Overloaded). An abort that
arrives before its request (the caller gave up while its submit or reserve was on the way)
is remembered, so that the request is refused when it arrives instead of holding blocks.

A worker with tensor-parallel ranks talks to them at the loop's turns (engine/parallel.py):
its Turns say what each turn carries to them and asks of them, and when a turn is needed
although there is nothing to run (something to register on every rank, a part to settle).

Live migration (decode side): detach() takes a decoding request out of the batch at the
loop's next turn, after every delta of the turns before it was handed on, so its caller's
stream ends (an "abort" delta) exactly after the last token it got; its blocks stay until
the worker releases them (the KV copied elsewhere) or reattach() lets it go on here.

A step that raises cannot be blamed on one request (those that can fail alone, in sampling
or post-processing, are failed by the engine itself): the loop then stops for good, every
request ends with a retryable error, and `healthy` turns False at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from proto.errors import Overloaded, RequestAborted, Unavailable
from proto.serving import DETACHED, Detached, FinishReason, Resume, StepRecord, TokenDelta, WorkerStats, final_delta

if TYPE_CHECKING:  # the loop only drives an engine: importing it would load torch
    from engine.llm_engine import EngineRequest, LLMEngine, RequestOutput

__all__ = [
    "REPORT_POLL_S",
    "SLOW_REPORT_POLL_S",
    "EngineLoop",
    "Overloaded",
    "RequestAborted",
    "Turn",
    "Turns",
    "Unavailable",
    "delta_stream",
    "final_delta",
    "to_delta",
]

IDLE_WAIT_S = 0.05  # how often an idle loop looks for work it was not woken for
# How often a worker with nothing to run asks its tensor-parallel followers about the KV
# transfer parts they still hold (Turns.idle_wait); while it runs, it asks at every step.
# Fast while a request waits only for them (rank 0's part is in: theirs is due), slow
# otherwise: on shared cores, a poll takes time from the prefill that fills those parts.
REPORT_POLL_S = 0.001
SLOW_REPORT_POLL_S = 0.02


@dataclass(frozen=True)
class Turn:
    """What goes with one turn of the loop besides its batch (see engine/parallel.py)."""

    hook: Callable[[int], None] | None = None  # rank 0's per-layer hook for this step
    payload: object = None  # picklable, to every tensor-parallel follower's on_step
    on_reports: Callable[[list[object]], None] | None = None  # if set, gets the followers' reports


class Turns(Protocol):
    """The worker around the loop: what each turn carries, and when one is needed without work."""

    def before_run(self, out: SchedulerOutput) -> Turn:
        """Under the loop's lock, with the turn's schedule (empty on a turn without work)."""
        ...

    def idle_wait(self) -> float | None:
        """Under the loop's lock: how long after the last turn an idle loop must take another
        (0: at once), or None when only work needs one."""
        ...

    def stopped(self, reason: BaseException) -> None:
        """The loop stopped for good (after its last turn): settle whatever waited for a turn."""
        ...


MAX_TOMBSTONES = 4096  # aborts remembered for requests not seen yet; request ids are unique
MAX_STEP_RECORDS = 20_000  # steps kept for take_steps(), newest first kept


def to_delta(out: RequestOutput) -> TokenDelta:
    return TokenDelta(
        request_id=out.request_id,
        token_ids=tuple(out.new_token_ids),
        text=out.new_text,
        finished=out.finished,
        finish_reason=out.finish_reason,
        num_prompt_tokens=len(out.prompt_token_ids),
        num_cached_tokens=out.num_cached_tokens,
        error=out.error,
    )


async def delta_stream(
    start: Callable[[Callable[[TokenDelta], None]], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> AsyncGenerator[TokenDelta, None]:
    """Bridge a request's deltas from the engine thread into the caller's event loop.

    start(on_delta) begins the request; deltas are yielded until the final one. If the
    caller stops iterating first (client gone, cancelled), stop() aborts the request.
    Deltas that arrived while the caller was busy are yielded joined (TokenDelta.then): a
    caller that cannot keep up (a stream crossing Ray, whose every item is an object) gets
    one item per turn holding every step since, not a backlog of one token each.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenDelta] = asyncio.Queue()

    def on_delta(delta: TokenDelta) -> None:  # called on the engine's thread
        loop.call_soon_threadsafe(queue.put_nowait, delta)

    await start(on_delta)
    finished = False
    try:
        while not finished:
            delta = await queue.get()
            while not delta.finished and not queue.empty():
                delta = delta.then(queue.get_nowait())
            finished = delta.finished
            yield delta
    finally:
        if not finished:
            await stop()


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, turns: Turns | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.turns = turns
        self._last_turn = time.monotonic()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._callbacks: dict[str, Callable[[TokenDelta], None]] = {}
        # Decode side: reservations waiting for a batch slot and blocks, oldest first.
        self._reservations: OrderedDict[str, tuple[EngineRequest, Future[list[int]]]] = OrderedDict()
        self._detaching: dict[str, Future[Detached]] = {}  # detach() calls for the next turn
        self._tombstones: OrderedDict[str, None] = OrderedDict()  # aborted before they arrived
        self._releases: list[str] = []  # appended by KV transfer threads, drained by the loop
        self._releases_lock = threading.Lock()
        self._steps: deque[StepRecord] = deque(maxlen=MAX_STEP_RECORDS)
        self._stopping = False
        self._finished = False  # _run() has ended: release_soon() frees at once
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """False from the moment the loop stopped or its engine broke."""
        return self._error is None and not self._stopping

    def check_running(self) -> None:
        """Raise Unavailable (naming why) once the loop stopped or its engine broke."""
        if not self.healthy:
            raise Unavailable(f"engine loop is not running: {self._error or 'stopped'}")

    def _check_admissible(self, request_id: str) -> None:
        """Under the lock, before a request is queued: the loop runs, the request was not
        aborted already, and the queues have room."""
        self.check_running()
        if request_id in self._tombstones:
            del self._tombstones[request_id]
            raise RequestAborted(f"{request_id} was aborted before it arrived")
        num_waiting = len(self.engine.scheduler.waiting) + len(self._reservations)
        if num_waiting >= self.max_waiting:
            raise Overloaded(
                f"{num_waiting} requests are already waiting (max_waiting={self.max_waiting}); retry later"
            )

    def submit(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        on_delta: Callable[[TokenDelta], None],
        hold_blocks: bool = False,
        resume: Resume | None = None,
    ) -> None:
        """Queue a request (resume: continue one a lost worker started, LLMEngine.add_request).
        Bad input raises ValueError here, before anything is queued."""
        with self._lock:
            self._check_admissible(request_id)
            if request_id in self._reservations:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.engine.add_request(request_id, prompt, params, hold_blocks=hold_blocks, resume=resume)
            self._callbacks[request_id] = on_delta
            self._work.notify()

    def reserve(
        self, request_id: str, prompt: list[int], params: SamplingParams, resume: Resume | None = None
    ) -> Future[list[int]]:
        """Decode side: blocks for a prompt prefilled elsewhere, or for a request migrated from
        another decode worker (resume; see LLMEngine.reserve).

        Bad input raises ValueError and a full queue Overloaded, here. Otherwise the request
        waits, first in first out, until the batch and the cache have room; the future then
        gets its block ids, or RequestAborted if abort() came first, or the loop's error.
        Callbacks on the future run under the loop's lock: they must not call the loop.
        """
        future: Future[list[int]] = Future()
        with self._lock:
            self._check_admissible(request_id)
            if request_id in self._reservations:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._reservations[request_id] = (self.engine.new_reservation(request_id, prompt, params, resume), future)
            self._grant_reservations()
        return future

    def _grant_reservations(self) -> None:
        """Under the lock: give blocks to waiting reservations in order, while they fit."""
        while self._reservations:
            request_id, (seq, future) = next(iter(self._reservations.items()))
            if not self.engine.can_reserve(seq):
                return
            del self._reservations[request_id]
            if not future.set_running_or_notify_cancel():
                continue  # its waiter gave up: no blocks for it
            try:
                future.set_result(self.engine.reserve_blocks(seq))
            except ValueError as exc:  # its id was taken meanwhile by a submit
                future.set_exception(exc)

    def admit(self, request_id: str, first_token_id: int, on_delta: Callable[[TokenDelta], None]) -> None:
        """Decode side: the KV arrived; stream from the first token (a migrated request's
        caller has it already: its stream goes on with the next one)."""
        with self._lock:
            self.check_running()
            out = self.engine.admit(request_id, first_token_id)
            if out is None or not out.finished:
                self._callbacks[request_id] = on_delta
            else:  # done at its first token (max_tokens 1, a stop token): its slot is free now
                self._grant_reservations()
            self._work.notify()
        if out is not None:
            on_delta(to_delta(out))

    def detach(self, request_id: str) -> Future[Detached]:
        """Take a decoding request out of the batch at the next turn, its blocks kept (live
        migration). Its callback's last delta is then an "abort", after every token it was
        given. The future gets the Detached, or ValueError when the request is not decoding
        here (waiting, prefilling, finished: it goes on untouched)."""
        future: Future[Detached] = Future()
        with self._lock:
            self.check_running()
            if request_id in self._detaching:
                raise ValueError(f"{request_id} is being detached already")
            self._detaching[request_id] = future
            self._work.notify()
        return future

    def reattach(self, request_id: str, on_delta: Callable[[TokenDelta], None]) -> None:
        """A detached request goes on here where it stopped, streaming to on_delta
        (ValueError when it is not detached)."""
        with self._lock:
            self.check_running()
            if request_id not in self.engine.scheduler.detached:
                raise ValueError(f"{request_id} is not detached here")
            self.engine.reattach(request_id)
            self._callbacks[request_id] = on_delta
            self._work.notify()

    def _take_detaching(self) -> list[tuple[Callable[[TokenDelta], None], TokenDelta]]:
        """Under the lock, at a turn: detach what was asked; returns the final deltas to hand on."""
        detaching, self._detaching = self._detaching, {}
        deliveries = []
        for request_id, future in detaching.items():
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up: it goes on here
            try:
                seq = self.engine.detach(request_id)
            except ValueError as exc:
                future.set_exception(exc)
                continue
            num_blocks = self.engine.block_manager.blocks_for(seq.num_computed_tokens)
            future.set_result(Detached(request_id, len(seq), tuple(seq.block_ids[:num_blocks])))
            callback = self._callbacks.pop(request_id, None)
            if callback is not None:
                deliveries.append((callback, final_delta(request_id, FinishReason.ABORT, DETACHED)))
        return deliveries

    def abort(self, request_id: str) -> None:
        """Drop a request and free its blocks (held ones wait for release_soon); its
        callback gets a final "abort" delta. A request not seen yet is refused when it comes."""
        with self._lock:
            callback = self._callbacks.pop(request_id, None)
            queued = self._reservations.pop(request_id, None)
            if queued is not None:
                _fail(queued[1], RequestAborted(f"{request_id} was aborted while it waited for room"))
            elif request_id not in self.engine.requests:
                self._tombstones[request_id] = None
                while len(self._tombstones) > MAX_TOMBSTONES:
                    self._tombstones.popitem(last=False)
            self.engine.abort(request_id)
            self._grant_reservations()
        if callback is not None:
            callback(final_delta(request_id, FinishReason.ABORT))

    def release_soon(self, request_id: str) -> None:
        """Free a held request's blocks at the loop's next turn (at once once the loop has
        stopped: a transfer that ends later still gives its blocks back). Safe from any
        thread, never blocks long."""
        with self._releases_lock:
            self._releases.append(request_id)
        if self._finished:
            with self._lock:
                self._drain_releases()
        else:
            self.poke()

    def poke(self) -> None:
        """wake(), unless a turn is under way (it looks at idle_wait() again after it). Safe
        from any thread, never blocks long."""
        if self._lock.acquire(blocking=False):
            try:
                self._work.notify()
            finally:
                self._lock.release()

    def wake(self) -> None:
        """Look at Turns.idle_wait() again now (waits for a step that is running to end)."""
        with self._lock:
            self._work.notify()

    def stats(self, num_transfers: int = 0) -> WorkerStats:
        """The engine's gauges (num_transfers: what the caller counts of its own)."""
        # Gauges read with len() only, so no lock: a caller polling them (the router, every
        # fraction of a second, from an actor's event loop) never waits for a step.
        bm, sched = self.engine.block_manager, self.engine.scheduler
        return WorkerStats(
            num_waiting=len(sched.waiting) + len(self._reservations),
            num_running=len(sched.running),
            num_reserved=len(sched.reserved),
            num_held=len(sched.held),
            num_transfers=num_transfers,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            num_preemptions=sched.num_preemptions_total,
        )

    def take_steps(self) -> list[StepRecord]:
        """The steps run since the last call (the newest MAX_STEP_RECORDS), oldest first:
        what each computed and how long its turn took. Safe from any thread, never waits."""
        taken = []
        while self._steps:
            taken.append(self._steps.popleft())
        return taken

    def fail(self, reason: BaseException) -> None:
        """Stop for good because something the engine depends on broke (a lost tensor-parallel
        rank): unfinished requests end with an error delta naming `reason`."""
        with self._lock:
            self._error = self._error or reason
            self._stopping = True
            self._work.notify()

    def close(self) -> None:
        """Stop the thread after its current step; unfinished requests end with an error delta."""
        with self._lock:
            self._stopping = True
            self._work.notify()
        self._thread.join()

    def _drain_releases(self) -> None:
        with self._releases_lock:
            releases, self._releases = self._releases, []
        for request_id in releases:
            self.engine.release(request_id)
        if releases:
            self._grant_reservations()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    self._drain_releases()
                    while (timeout := self._idle_timeout()) is not None:
                        self._work.wait(timeout)
                    if self._stopping:
                        break
                    self._drain_releases()
                    detached = self._take_detaching()
                    started, started_at = time.perf_counter(), time.monotonic()
                    out = self.engine.schedule()
                    shape = out.shape()
                    turn = self.turns.before_run(out) if self.turns is not None else Turn()
                    outputs = self.engine.run(out, turn.hook, turn.payload, turn.on_reports)
                    self._last_turn = time.monotonic()
                    deliveries = [(self._callbacks.get(o.request_id), o) for o in outputs]
                    for o in outputs:
                        if o.finished:
                            self._callbacks.pop(o.request_id, None)
                    self._grant_reservations()  # finished requests gave their blocks back
                for on_delta, delta in detached:
                    on_delta(delta)
                for callback, output in deliveries:
                    if callback is not None:
                        callback(to_delta(output))
                if not out.is_empty:
                    ms = (time.perf_counter() - started) * 1e3
                    self._steps.append(StepRecord(*shape, ms=ms, at_s=started_at))
        except BaseException as exc:  # the engine broke: fail every request, never hang them
            self._error = exc
        self._fail_all(self._error or RuntimeError("engine loop stopped"))

    def _idle_timeout(self) -> float | None:
        """Under the lock: None if a turn is due now, else how long to wait for work."""
        if self._stopping or self.engine.has_unfinished() or self._releases or self._detaching:
            return None
        wait = self.turns.idle_wait() if self.turns is not None else None
        if wait is None:
            return IDLE_WAIT_S
        left = self._last_turn + wait - time.monotonic()
        return min(left, IDLE_WAIT_S) if left > 0 else None

    def _fail_all(self, reason: BaseException) -> None:
        if self.turns is not None:
            self.turns.stopped(reason)
        with self._lock:
            self._stopping = True
            callbacks, self._callbacks = self._callbacks, {}
            reservations, self._reservations = self._reservations, OrderedDict()
            detaching, self._detaching = self._detaching, {}
            for request_id in callbacks:
                self.engine.abort(request_id)
        for _req, reserved in reservations.values():
            _fail(reserved, Unavailable(f"engine loop is not running: {reason}"))
        for future in detaching.values():
            _fail(future, Unavailable(f"engine loop is not running: {reason}"))
        for request_id, callback in callbacks.items():
            callback(final_delta(request_id, FinishReason.ERROR, str(reason)))
        with self._lock:  # what Turns.stopped() released, and from now on release_soon() itself
            self._finished = True
            self._drain_releases()


def _fail(future: Future[Any], error: BaseException) -> None:
    """Fail a reservation's (or a detach's) future unless its waiter cancelled it already."""
    if future.set_running_or_notify_cancel():
        future.set_exception(error)

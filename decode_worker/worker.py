"""The decode loop, testable without Ray.

A request's lifecycle on a decode worker:

 1. reserve(): the request waits (first in, first out) for a batch slot and blocks for its
    prompt (request_blocks), which are then registered with the KV receiver of every
    tensor-parallel rank, with a deadline (register); the caller gets a KVHandle (all
    ranks' endpoints) to give the prefill worker;
 2. the KV arrives layer by layer, each rank receiving its own KV heads;
 3. admit(first_token): once every rank's part is DONE (wait_kv) the request joins the
    running batch with the prefill worker's first token; if a part failed, the caller gets
    TransferFailed and the blocks are freed once no sender can write any rank's part;
 4. it decodes in the continuous batch and streams deltas until it finishes.
Short prompts skip 1-3: generate() prefills here (conditional disaggregation).
An abort at any step frees everything the request holds, never blocks a sender may still write.

Live migration to another decode worker (the router drives it, router/orchestrator.py):
 1. detach(): the request leaves the running batch at the next turn, its blocks kept; its
    stream ends after the last token it got;
 2. the destination reserve()s blocks for it (a GenerateRequest with resume: the tokens
    generated here), exactly as for a prefill;
 3. migrate_out(handle): this worker's own KV sender (made on first use) pushes every layer
    of the request's blocks there; the destination admit()s it with its newest token, whose
    KV its first step computes;
 4. the source frees the blocks only once the destination confirmed the copy (DONE). A copy
    that failed leaves the request detached here, whole: reattach() lets it go on where it
    stopped, abort() frees it. One that is neither within DETACHED_TIMEOUT_S is aborted here.
With tensor parallelism every rank sends its own KV heads (rank 0 orders the followers'
parts at a turn, Orders.send, and hears how each let go of the blocks in their reports);
the copy is done when every part is DONE, and rank 0 frees the blocks only once every part
let go of them.

Tensor parallelism: the worker is tp processes. Rank 0 (DecodeWorker) owns the scheduler
and the block ids; every rank r > 0 (DecodeFollower) runs rank 0's steps and has its own
KV receiver on its own cache, which holds the same block ids. Rank 0 talks to the followers
over the control group the ranks already share, at the loop's turns (engine/parallel.py):
the turn's payload carries its Orders (blocks to register, parts to cancel), and each
follower answers with a RankReport (registrations it refused, parts that *settled*: no
sender can write their blocks any more, because the KV is in or the part failed and let
them go). register() returns once every rank has registered (a turn: at most one step's
wait, at once when idle); rank 0 asks for reports at every step while some follower part
is open; when idle, every REPORT_POLL_S while some request's KV is in on rank 0 but not yet
known to be on every rank, and every SLOW_REPORT_POLL_S while parts are open otherwise.
The request runs only if every rank's part is DONE; any failure wins. Rank 0 frees the
blocks of a request that will not run only when every rank's part is settled. No Ray call
or future per follower and request: one small collective per step while transfers are
open, none otherwise.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from decode_worker.follower import Orders, RankReport, Settled, expect_part
from engine import EngineConfig, LLMEngine
from engine.engine_loop import REPORT_POLL_S, SLOW_REPORT_POLL_S, EngineLoop, RequestAborted, Turn
from engine.scheduler import SchedulerOutput
from kv_transfer import KVReceiver, KVSender, Transfer, TransferState
from proto.serving import Detached, GenerateRequest, KVHandle, StepRecord, TokenDelta, WorkerStats

DETACHED_TIMEOUT_S = 120.0  # a detached request neither sent, reattached nor aborted by then is aborted


class TransferFailed(RuntimeError):
    """The request's KV never arrived (deadline, lost prefill worker, lost rank, cancel)."""


class DecodeState(StrEnum):
    """Where a request is on a decode worker before it runs (its _Decode record); once admitted
    the engine owns it and the record goes."""

    WAITING = "waiting"  # queued for a batch slot and blocks (request_blocks)
    RECEIVING = "receiving"  # blocks registered with every rank's receiver: the KV arriving
    DROPPED = "dropped"  # will never run: every part stopped, blocks freed once all settle


@dataclass
class _Decode:
    """The one record a decode worker (rank 0) keeps per request until it runs or its blocks
    are freed; its KV arrives in one part per rank (rank 0's first)."""

    state: DecodeState = DecodeState.WAITING
    transfer: Transfer | None = None  # rank 0's part, once registered
    parts: list[Settled | None] = field(default_factory=list)  # how each rank's part settled; None: not yet
    registered: Future[None] = field(default_factory=Future)  # every follower answered the registration
    released: bool = False  # the blocks were given back to the engine
    kv_ready: Future = field(default_factory=Future)  # set once every part is DONE or one failed

    def settled(self) -> bool:
        return bool(self.parts) and all(p is not None for p in self.parts)

    def failure(self) -> str | None:
        """Why some part failed (rank 0's seen at once, the others' once settled); None if none did."""
        if self.transfer is None:
            return None
        states = [(self.transfer.state, self.transfer.error)]
        states += [p or (TransferState.PENDING, None) for p in self.parts[1:]]
        for rank, (state, error) in enumerate(states):
            if state.is_terminal and state is not TransferState.DONE:
                why = error or state.value
                return f"rank {rank}: {why}" if len(self.parts) > 1 else why
        return None


@dataclass
class _Outgoing:
    """A request detached here to migrate (rank 0): its blocks stay until the copy is confirmed."""

    detached: Detached
    copying: bool = False  # a copy started and some rank's part still reads the blocks
    transfer: Transfer | None = None  # rank 0's part of that copy, once started
    aborted: bool = False  # free the blocks as soon as no copy reads them
    parts: list[Settled | None] = field(default_factory=list)  # how each rank's part let go; None: not yet
    done: Future[None] = field(default_factory=Future)  # the copy: None once every part is DONE, else TransferFailed


class DecodeWorker:
    def __init__(
        self,
        model_dir: str | Path,
        engine_config: EngineConfig,
        kv_backend: str,
        host: str = "127.0.0.1",
        transfer_timeout_s: float = 30.0,
        max_waiting: int = 256,
        dist_init: str | None = None,
        *,
        kv_secret: bytes,
        engine: LLMEngine | None = None,
    ):
        """dist_init: with tensor_parallel_size > 1, the process group address all ranks join
        (each follower's DecodeFollower is built at the same time, in its own process).
        kv_secret: the deployment's (kv_transfer/auth.py); only prefill workers holding it may
        send KV here. engine: one already loaded to run on (a role change), else one is built."""
        self.engine = engine or LLMEngine(model_dir, engine_config, rank=0, dist_init=dist_init)
        self.num_ranks = engine_config.num_ranks
        self.transfer_timeout_s = transfer_timeout_s
        self.kv_backend = kv_backend
        self._kv_secret = kv_secret
        self._sender: KVSender | None = None  # for migrations out, made on first use
        self._outgoing: dict[str, _Outgoing] = {}  # requests detached to migrate
        # tp > 1: followers' send parts to order at the next turn, to stop, and those still out.
        self._send_orders: list[tuple[str, str, tuple[int, ...], tuple[str, ...], float]] = []
        self._stop_sends: list[tuple[str, str]] = []
        self._sending: dict[str, _Outgoing] = {}
        self.receiver = KVReceiver(
            kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout, secret=kv_secret, host=host
        )
        # Every rank's receiver, in rank order: the followers tell theirs as they start.
        group = self.engine.group
        self.endpoints = tuple(str(e) for e in group.gather(self.endpoint)) if group else (self.endpoint,)
        self._lock = threading.Lock()
        self._requests: dict[str, _Decode] = {}  # from request_blocks() until admitted or dropped
        # tp > 1: what the next turn tells the followers, and the records with parts still open there.
        self._registering: dict[str, tuple[_Decode, tuple[int, ...]]] = {}
        self._cancels: list[tuple[str, str]] = []
        self._open: dict[str, _Decode] = {}
        self._stopped: BaseException | None = None
        self.loop = EngineLoop(self.engine, max_waiting=max_waiting, turns=self)

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def reserve(self, request: GenerateRequest, timeout_s: float | None = None) -> KVHandle:
        """request_blocks() then register(), blocking up to timeout_s for room (TimeoutError)."""
        return self.register(request.request_id, self.request_blocks(request).result(timeout_s))

    def request_blocks(self, request: GenerateRequest) -> Future:
        """Queue the request for blocks; the future gets them once the batch and the cache have
        room (or RequestAborted). Raises ValueError for a bad prompt and Overloaded when
        max_waiting requests wait already."""
        request_id = request.request_id
        record = _Decode()
        with self._lock:
            if request_id in self._requests or request_id in self._open:  # _open: a dropped one still settling
                raise ValueError(f"request id {request_id!r} is already in use")
            self._requests[request_id] = record
        try:
            granted = self.loop.reserve(request_id, list(request.prompt_token_ids), request.params, request.resume)
        except BaseException:
            self._forget(request_id, record)
            raise

        def on_granted(f: Future) -> None:  # under the loop's lock: no calls back into it
            if f.cancelled() or f.exception() is not None:
                self._forget(request_id, record)  # no blocks, no record

        granted.add_done_callback(on_granted)
        return granted

    def _forget(self, request_id: str, record: _Decode) -> None:
        with self._lock:
            if self._requests.get(request_id) is record:
                del self._requests[request_id]

    def register(self, request_id: str, block_ids: list[int]) -> KVHandle:
        """Register granted blocks with every rank's KV receiver; returns where prefill must push."""
        with self._lock:
            record = self._requests.get(request_id)
        if record is None:
            raise TransferFailed(f"{request_id} was never given blocks here")
        record.parts = [None] * self.num_ranks
        record.transfer = expect_part(
            self.receiver,
            request_id,
            block_ids,
            self.transfer_timeout_s,
            lambda settled: self._settle(request_id, record, 0, settled),
        )
        # Rank 0's failure is known before its blocks are let go: wake the waiters at once.
        record.transfer.add_done_callback(lambda _t: self._part_settled(request_id, record))
        if self.num_ranks > 1:
            with self._lock:
                stopped = self._stopped
                if stopped is None:
                    self._registering[request_id] = (record, tuple(block_ids))
                    self._open[request_id] = record
            if stopped is None:
                self.loop.wake()  # the next turn carries the registration to every follower
            else:
                record.registered.set_exception(TransferFailed(f"the engine loop stopped: {stopped}"))
        else:
            record.registered.set_result(None)
        error: BaseException | None = None
        try:
            record.registered.result()
        except BaseException as exc:  # the loop stopped: no turn will carry it
            error = exc
        with self._lock:
            aborted = record.state is DecodeState.DROPPED
            if aborted:
                self._requests.pop(request_id, None)
            else:
                record.state = DecodeState.RECEIVING
        if aborted:
            self._drop(request_id, record)
            raise RequestAborted(f"{request_id} was aborted while its blocks were being registered")
        refused = error or record.failure()
        if refused is not None:
            self.abort(request_id)  # the parts registered are cancelled, then the blocks freed
            raise TransferFailed(f"could not register {request_id}'s blocks on every rank: {refused}")
        return KVHandle(request_id, self.endpoints)

    def _settle(self, request_id: str, record: _Decode, rank: int, settled: Settled) -> None:
        """Rank `rank`'s part settled (rank 0's on a receiver thread, the others' on the loop's)."""
        with self._lock:
            if record.parts[rank] is None:
                record.parts[rank] = settled
            if record.settled() and self._open.get(request_id) is record:
                del self._open[request_id]
            followers_due = rank == 0 and request_id in self._open
        if followers_due:
            self.loop.poke()  # idle: ask the followers for theirs soon (idle_wait)
        self._part_settled(request_id, record)

    def _part_settled(self, request_id: str, record: _Decode) -> None:
        """Runs on whatever thread ended or settled a part (possibly under a receiver's or the
        loop's lock: no calls back). A failed request keeps its record (admit reports the
        failure) but gets its blocks freed once every part is settled."""
        with self._lock:
            if not record.kv_ready.done() and (record.settled() or record.failure()):
                record.kv_ready.set_result(None)
            dropped = record.state is DecodeState.DROPPED
            if record.released or not record.settled() or not (dropped or record.failure()):
                return
            record.released = True
        self.loop.release_soon(request_id)

    def _drop(self, request_id: str, record: _Decode) -> None:
        """A registered request that will never run: stop every part, free once all settled."""
        with self._lock:
            record.state = DecodeState.DROPPED
            tell_followers = self._open.get(request_id) is record
            if tell_followers:
                self._cancels.append((request_id, "request aborted"))
        assert record.transfer is not None
        record.transfer.cancel("request aborted")  # no effect on a settled part
        if tell_followers:
            self.loop.wake()
        self._part_settled(request_id, record)  # frees now if every part had settled already

    # ---- the loop's Turns: the followers' orders and reports (tensor parallelism) ----------

    def before_run(self, out: SchedulerOutput) -> Turn:
        """On the engine thread: carry the registrations and cancels since the last turn, and
        hear the followers while they have news to give."""
        with self._lock:
            if not self._open and not self._cancels and not self._sending and not self._stop_sends:
                return Turn()
            registering = dict(self._registering)  # left there until answered: stopped() fails them
            cancels, self._cancels = self._cancels, []
            sends, self._send_orders = self._send_orders, []
            stop_sends, self._stop_sends = self._stop_sends, []
        registrations = tuple((r, ids, self.transfer_timeout_s) for r, (_, ids) in registering.items())
        orders = Orders(registrations, tuple(cancels), tuple(sends), tuple(stop_sends))

        def on_reports(reports: list[object]) -> None:
            self._on_reports(reports)
            with self._lock:
                for request_id in registering:
                    del self._registering[request_id]
            for record, _ in registering.values():  # every rank took its registration, or refused it
                record.registered.set_result(None)

        return Turn(payload=orders, on_reports=on_reports)

    def _on_reports(self, reports: list[object]) -> None:
        for rank, report in enumerate(reports, 1):
            assert isinstance(report, RankReport)
            news: list[tuple[str, Settled]] = [
                (r, (TransferState.FAILED, f"refused: {why}")) for r, why in report.refused
            ]
            news += [(r, (state, error)) for r, state, error in report.settled]
            for request_id, settled in news:
                with self._lock:
                    record = self._open.get(request_id)
                if record is not None:
                    self._settle(request_id, record, rank, settled)
            for request_id, state, error in report.sent:
                with self._lock:
                    outgoing = self._sending.get(request_id)
                if outgoing is not None:
                    self._send_part_released(request_id, outgoing, rank, (state, error))

    def idle_wait(self) -> float | None:
        with self._lock:
            if self._registering or self._cancels or self._send_orders or self._stop_sends:
                return 0.0
            if self._sending:
                return REPORT_POLL_S  # a paused request waits for its copy
            if not self._open:
                return None
            due = any(r.parts[0] is not None for r in self._open.values())
            return REPORT_POLL_S if due else SLOW_REPORT_POLL_S

    def stopped(self, reason: BaseException) -> None:
        """The loop stopped (e.g. a rank was lost): no follower will report again, so every
        open part settles as failed and every registration waiting for a turn fails."""
        with self._lock:
            self._stopped = reason
            registering, self._registering = self._registering, {}
            open_records = list(self._open.items())
            sending = list(self._sending.items())
        for record, _ in registering.values():
            if not record.registered.done():
                record.registered.set_exception(TransferFailed(f"the engine loop stopped: {reason}"))
        for request_id, record in open_records:
            for rank in range(1, self.num_ranks):
                self._settle(request_id, record, rank, (TransferState.FAILED, f"the engine loop stopped: {reason}"))
        for request_id, outgoing in sending:
            for rank in range(1, self.num_ranks):
                lost = (TransferState.FAILED, f"the engine loop stopped: {reason}")
                self._send_part_released(request_id, outgoing, rank, lost)

    def transfer_of(self, request_id: str) -> Transfer:
        """Rank 0's part of a reserved request's transfer."""
        with self._lock:
            transfer = self._requests[request_id].transfer
        assert transfer is not None, f"{request_id}'s blocks are not registered yet"
        return transfer

    def wait_kv(self, request_id: str, timeout_s: float | None = None) -> bool:
        """Block until every part is DONE or some part failed; False if timeout_s passed first."""
        record = self._record(request_id)
        if record is None:
            return True
        try:
            record.kv_ready.result(timeout_s)
        except TimeoutError:
            return False
        return True

    async def wait_kv_async(self, request_id: str) -> None:
        """wait_kv() from an asyncio loop, without tying up a thread."""
        record = self._record(request_id)
        if record is not None:  # shield: a cancelled waiter must not cancel kv_ready itself
            await asyncio.shield(asyncio.wrap_future(record.kv_ready))

    def _record(self, request_id: str) -> _Decode | None:
        with self._lock:
            return self._requests.get(request_id)

    def admit(self, request_id: str, first_token_id: int, on_delta: Callable[[TokenDelta], None]) -> None:
        """Call once wait_kv(request_id) returned; starts streaming."""
        with self._lock:
            record = self._requests.get(request_id)
            if record is not None and record.state is DecodeState.RECEIVING:
                del self._requests[request_id]
            else:
                record = None
        if record is None:
            raise TransferFailed(f"{request_id} was aborted before it was admitted")
        if not record.settled() or record.failure():
            error = record.failure() or "not every tensor-parallel rank had it yet"
            self._drop(request_id, record)
            raise TransferFailed(f"KV of {request_id} did not arrive: {error}")
        try:
            self.loop.admit(request_id, first_token_id, on_delta)
        except KeyError:  # aborted while we were admitting: the KV is here, nobody writes it
            self.loop.release_soon(request_id)
            raise TransferFailed(f"{request_id} was aborted before it was admitted") from None

    def generate(self, request: GenerateRequest, on_delta: Callable[[TokenDelta], None]) -> None:
        """Prefill here and decode (short prompts: conditional disaggregation; a request resumed
        after its worker was lost)."""
        self.loop.submit(
            request.request_id, list(request.prompt_token_ids), request.params, on_delta, resume=request.resume
        )

    def abort(self, request_id: str) -> None:
        with self._lock:
            outgoing = self._outgoing.get(request_id)
            if outgoing is not None:
                outgoing.aborted = True
                free_now, copy = not outgoing.copying, outgoing.transfer
                if free_now:
                    del self._outgoing[request_id]
        if outgoing is not None:
            self.loop.abort(request_id)  # its blocks are held: freed below, or once the copy lets go
            if free_now:
                self.loop.release_soon(request_id)
            else:
                if copy is not None:  # else migrate_out() cancels it once started
                    copy.cancel("request aborted")
                if self.num_ranks > 1:
                    with self._lock:
                        self._stop_sends.append((request_id, "request aborted"))
                    self.loop.wake()
            return
        with self._lock:
            record = self._requests.get(request_id)
            registered = record is not None and record.state is DecodeState.RECEIVING
            if record is not None:
                if registered:
                    del self._requests[request_id]
                record.state = DecodeState.DROPPED  # WAITING: register() drops it, if granted
        self.loop.abort(request_id)
        if registered:
            assert record is not None
            self._drop(request_id, record)
        # else: waiting (the loop fails its grant, or register() drops it), running (the
        # engine freed its blocks), finished, or unknown

    # ---- live migration out (the source side) ----------------------------------------------

    def detach(self, request_id: str) -> Future[Detached]:
        """Take a decoding request out of the batch at the next turn, its blocks kept, to
        migrate it; its stream ends with an "abort" delta after its last token. The future
        fails with ValueError when it is not decoding here (it goes on untouched)."""
        future = self.loop.detach(request_id)

        def on_detached(f: Future[Detached]) -> None:  # under the loop's lock: no calls back into it
            if f.cancelled() or f.exception() is not None:
                return
            with self._lock:
                self._outgoing[request_id] = _Outgoing(f.result())
            timer = threading.Timer(DETACHED_TIMEOUT_S, self._expire_detached, (request_id, f.result()))
            timer.daemon = True
            timer.start()

        future.add_done_callback(on_detached)
        return future

    def _expire_detached(self, request_id: str, detached: Detached) -> None:
        with self._lock:
            outgoing = self._outgoing.get(request_id)
            stale = outgoing is not None and outgoing.detached is detached and not outgoing.copying
        if stale:
            self.abort(request_id)

    def migrate_out(self, request_id: str, handle: KVHandle) -> Future[None]:
        """Copy a detached request's KV into the blocks `handle`'s worker reserved for it (its
        request id there is handle.request_id), every rank its own heads; the future gets None
        once every rank's part is DONE (the blocks are then freed here), or TransferFailed:
        the request then stays detached (reattach() or abort())."""
        with self._lock:
            outgoing = self._outgoing.get(request_id)
            if outgoing is None or outgoing.aborted:
                raise TransferFailed(f"{request_id} is not detached here")
            if outgoing.copying:
                raise TransferFailed(f"{request_id} is being copied already")
            # From now on only the parts' releases free the blocks.
            outgoing.copying, outgoing.parts, outgoing.done = True, [None] * self.num_ranks, Future()
            if self._sender is None:
                layout = self.engine.kv_cache.layout
                self._sender = KVSender(self.kv_backend, self.engine.kv_cache.tensor, layout, secret=self._kv_secret)
            sender = self._sender
            ids, timeout_s = outgoing.detached.block_ids, self.transfer_timeout_s
            if self.num_ranks > 1:
                self._send_orders.append((request_id, handle.request_id, ids, handle.endpoints, timeout_s))
                self._sending[request_id] = outgoing
        if self.num_ranks > 1:
            self.loop.wake()  # the next turn orders every follower's part
        done = outgoing.done
        started: list[Transfer] = []  # empty if it fails inside start(): never DONE then

        def on_release() -> None:
            transfer = started[0] if started else None
            settled = (transfer.state, transfer.error) if transfer else (TransferState.FAILED, "could not start")
            self._send_part_released(request_id, outgoing, 0, settled)

        try:
            started.append(transfer := sender.start(handle.request_id, ids, handle.endpoints, timeout_s, on_release))
        except Exception as exc:  # it never started: nothing reads the blocks on this rank
            self._send_part_released(request_id, outgoing, 0, (TransferState.FAILED, str(exc)))
            return done
        with self._lock:
            outgoing.transfer = transfer
            aborted = outgoing.aborted
        if aborted:
            transfer.cancel("request aborted")
        for layer in self.engine.kv_cache.layout.layers:  # the KV is all in place
            sender.push_layer(handle.request_id, layer)
        return done

    def _send_part_released(self, request_id: str, outgoing: _Outgoing, rank: int, settled: Settled) -> None:
        """One rank's part of a copy let go of the blocks (a KV transfer thread, or the loop's
        for a follower's). A failed part stops the others; once every part let go, the blocks
        are freed if every part landed (the request lives on elsewhere) or it was aborted, and
        the request otherwise stays detached here."""
        state, error = settled
        with self._lock:
            if outgoing.parts[rank] is not None:
                return
            outgoing.parts[rank] = settled
            stop_others = state is not TransferState.DONE and any(p is None for p in outgoing.parts)
            if stop_others and self.num_ranks > 1 and self._sending.get(request_id) is outgoing:
                self._stop_sends.append((request_id, f"rank {rank}'s part failed: {error}"))
            rank0 = outgoing.transfer
            if any(p is None for p in outgoing.parts):
                finished = False
            else:
                finished = True
                if self._sending.get(request_id) is outgoing:
                    del self._sending[request_id]
                settled_parts = [p for p in outgoing.parts if p is not None]
                failures = [
                    (r, e or st.value) for r, (st, e) in enumerate(settled_parts) if st is not TransferState.DONE
                ]
                outgoing.copying, outgoing.transfer = False, None
                free = not failures or outgoing.aborted
                if free and self._outgoing.get(request_id) is outgoing:
                    del self._outgoing[request_id]
        if stop_others:
            if rank0 is not None and rank != 0:
                rank0.cancel(f"rank {rank}'s part failed: {error}")
            if self.num_ranks > 1:
                self.loop.poke()  # may run on the loop's own thread, under its lock: never wake()
        if not finished:
            return
        if free:
            self.loop.release_soon(request_id)  # a live detached request is aborted, then freed
        if failures:
            why = "; ".join(f"rank {r}: {w}" for r, w in failures) if self.num_ranks > 1 else failures[0][1]
            outgoing.done.set_exception(TransferFailed(why))
        else:
            outgoing.done.set_result(None)

    def reattach(self, request_id: str, on_delta: Callable[[TokenDelta], None]) -> None:
        """A detached request whose migration failed goes on here where it stopped
        (ValueError when it is not detached, or its copy is still running)."""
        with self._lock:
            outgoing = self._outgoing.get(request_id)
            if outgoing is None or outgoing.aborted or outgoing.copying:
                raise ValueError(f"{request_id} is not detached here, or its copy is still running")
            del self._outgoing[request_id]
        self.loop.reattach(request_id, on_delta)

    def stats(self) -> WorkerStats:
        """Raises Unavailable once the engine broke: the router then stops picking this worker."""
        self.loop.check_running()
        with self._lock:
            num_transfers = sum(r.state is DecodeState.RECEIVING for r in self._requests.values())
            num_transfers += sum(o.copying for o in self._outgoing.values())
        return self.loop.stats(num_transfers)

    def take_steps(self) -> list[StepRecord]:
        """The steps its engine ran since the last call (EngineLoop.take_steps)."""
        return self.loop.take_steps()

    def close(self, keep_engine: bool = False) -> None:
        """keep_engine: stop serving but leave the engine (its weights, cache) to another shell."""
        self.loop.close()
        if not keep_engine:
            self.engine.close()  # with tensor parallelism: stops the followers
        self.receiver.close()
        if self._sender is not None:
            self._sender.close()

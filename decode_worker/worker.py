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

Tensor parallelism: the worker is tp processes. Rank 0 (DecodeWorker) owns the scheduler
and the block ids; every rank r > 0 (DecodeFollower) runs rank 0's steps and has its own
KV receiver on its own cache, which holds the same block ids. Rank 0 reaches a follower
through a RankPort: expect() registers the blocks there and returns a future that resolves
once that rank's part is *settled*, i.e. no sender can write its blocks any more (the KV is
in, or the part failed and its blocks were let go). Rank 0 frees the blocks of a request
that will not run only when every rank's part is settled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from engine import EngineConfig, LLMEngine
from engine.engine_loop import EngineLoop, RequestAborted
from kv_transfer import KVReceiver, Transfer, TransferState
from proto.serving import GenerateRequest, KVHandle, TokenDelta, WorkerStats

# How one rank's part of a transfer ended, once its blocks are safe: (state, error).
Settled = tuple[TransferState, str | None]


class TransferFailed(RuntimeError):
    """The request's KV never arrived (deadline, lost prefill worker, cancel)."""


class RankLost(RuntimeError):
    """A follower rank is gone: the worker cannot run its tensor-parallel engine any more."""


class RankPort(Protocol):
    """Rank 0's line to a follower rank of a tensor-parallel decode worker."""

    endpoint: str  # the follower's KV receiver

    def expect(self, request_id: str, block_ids: Sequence[int], timeout_s: float) -> Future[Settled]:
        """Register the blocks with the rank's receiver before returning (RankLost if the rank
        is gone); the future gets its Settled (or raises if the rank dies, which can no longer
        write either)."""

    def cancel(self, request_id: str, reason: str) -> None:
        """Stop the rank's part; its future settles once its blocks are let go."""


def expect_part(
    receiver: KVReceiver, request_id: str, block_ids: Sequence[int], timeout_s: float
) -> tuple[Transfer, Future[Settled]]:
    """Register one rank's part with its receiver; the future resolves to its Settled."""
    settled: Future[Settled] = Future()
    transfer = receiver.expect(
        request_id, block_ids, timeout_s, on_release=lambda: settled.set_result((transfer.state, transfer.error))
    )

    def on_done(t: Transfer) -> None:
        # DONE releases nothing (the blocks stay with the request) and no sender writes after it.
        if t.state is TransferState.DONE:
            settled.set_result((t.state, None))

    transfer.add_done_callback(on_done)
    return transfer, settled


def outcome(part: Future[Settled]) -> Settled:
    """A settled part's Settled; a rank that died settles as FAILED."""
    try:
        return part.result(timeout=0)
    except Exception as exc:  # the follower's actor or process is gone
        return TransferState.FAILED, f"tensor-parallel rank lost: {exc}"


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
    transfer: Transfer | None = None  # rank 0's part, once RECEIVING
    parts: list[Future[Settled]] = field(default_factory=list)  # every rank's Settled, rank 0's first
    ports: list[RankPort] = field(default_factory=list)  # followers with a part to cancel
    released: bool = False  # the blocks were given back to the engine
    kv_ready: Future = field(default_factory=Future)  # set once every part is DONE or one failed

    def settled(self) -> bool:
        return bool(self.parts) and all(p.done() for p in self.parts)

    def failure(self) -> str | None:
        """Why some part failed (rank 0's seen at once, the others' once settled); None if none did."""
        if self.transfer is None:
            return None
        states = [(self.transfer.state, self.transfer.error)]
        states += [outcome(p) if p.done() else (TransferState.PENDING, None) for p in self.parts[1:]]
        for rank, (state, error) in enumerate(states):
            if state.is_terminal and state is not TransferState.DONE:
                why = error or state.value
                return f"rank {rank}: {why}" if len(self.parts) > 1 else why
        return None


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
    ):
        """dist_init: with tensor_parallel_size > 1, the process group address all ranks join;
        then attach_followers() before the first reserve(). kv_secret: the deployment's
        (kv_transfer/auth.py); only prefill workers holding it may send KV here."""
        self.engine = LLMEngine(model_dir, engine_config, tp_rank=0, dist_init=dist_init)
        self.tp_size = engine_config.tensor_parallel_size
        self.transfer_timeout_s = transfer_timeout_s
        self.receiver = KVReceiver(
            kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout, secret=kv_secret, host=host
        )
        self.loop = EngineLoop(self.engine, max_waiting=max_waiting)
        self._followers: list[RankPort] = []
        self._pool = ThreadPoolExecutor(max(1, self.tp_size - 1), thread_name_prefix="decode-rank-port")
        self._lock = threading.Lock()
        self._requests: dict[str, _Decode] = {}  # from request_blocks() until admitted or dropped

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def attach_followers(self, ports: Sequence[RankPort]) -> None:
        """Ranks 1..tp-1, in rank order (each reports its receiver's endpoint)."""
        if len(ports) != self.tp_size - 1:
            raise ValueError(
                f"a tensor_parallel_size={self.tp_size} worker has {self.tp_size - 1} follower ranks, got {len(ports)}"
            )
        self._followers = list(ports)

    def reserve(self, request: GenerateRequest, timeout_s: float | None = None) -> KVHandle:
        """request_blocks() then register(), blocking up to timeout_s for room (TimeoutError)."""
        return self.register(request.request_id, self.request_blocks(request).result(timeout_s))

    def request_blocks(self, request: GenerateRequest) -> Future:
        """Queue the request for blocks; the future gets them once the batch and the cache have
        room (or RequestAborted). Raises ValueError for a bad prompt and Overloaded when
        max_waiting requests wait already."""
        if len(self._followers) != self.tp_size - 1:
            raise RuntimeError(f"the worker's {self.tp_size - 1} follower ranks are not attached yet")
        request_id = request.request_id
        record = _Decode()
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._requests[request_id] = record
        try:
            granted = self.loop.reserve(request_id, list(request.prompt_token_ids), request.params)
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
        transfer, settled = expect_part(self.receiver, request_id, block_ids, self.transfer_timeout_s)
        parts, ports = [settled], []
        # Every rank registers at once: a round trip per request, not one per rank.
        calls = [self._pool.submit(p.expect, request_id, block_ids, self.transfer_timeout_s) for p in self._followers]
        error = None
        for port, call in zip(self._followers, calls, strict=True):
            try:
                parts.append(call.result())
                ports.append(port)
            except BaseException as exc:  # keep collecting: the parts that did register must be cancelled
                error = error or exc
        with self._lock:
            record.transfer, record.parts, record.ports = transfer, parts, ports
            aborted = record.state is DecodeState.DROPPED
            if aborted:
                self._requests.pop(request_id, None)
            else:
                record.state = DecodeState.RECEIVING
        for part in parts:
            part.add_done_callback(lambda _f: self._part_settled(request_id, record))
        # Rank 0's failure is known before its blocks are let go: wake the waiters at once.
        transfer.add_done_callback(lambda _t: self._part_settled(request_id, record))
        if aborted:
            self._drop(request_id, record)
            raise RequestAborted(f"{request_id} was aborted while its blocks were being registered")
        if error is not None:
            self.abort(request_id)  # the parts registered are cancelled, then the blocks freed
            if isinstance(error, RankLost):
                self.loop.fail(error)  # every request ends with this error; stats() now raises
            raise TransferFailed(f"could not register {request_id}'s blocks on every rank: {error}") from error
        return KVHandle(request_id, (self.endpoint,) + tuple(p.endpoint for p in self._followers))

    def _part_settled(self, request_id: str, record: _Decode) -> None:
        """Runs on whatever thread ended or settled a part (possibly under a receiver's lock: no
        calls back). A failed request keeps its record (admit reports the failure) but gets its
        blocks freed once every part is settled."""
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
        assert record.transfer is not None
        record.transfer.cancel("request aborted")  # no effect on a settled part
        for port in record.ports:
            port.cancel(request_id, "request aborted")
        self._part_settled(request_id, record)  # frees now if every part had settled already

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

    def stats(self) -> WorkerStats:
        """Raises Unavailable once the engine broke: the router then stops picking this worker."""
        self.loop.check_running()
        with self._lock:
            num_transfers = sum(r.state is DecodeState.RECEIVING for r in self._requests.values())
        return self.loop.stats(num_transfers)

    def close(self) -> None:
        self.loop.close()
        self.engine.close()  # with tensor parallelism: stops the followers
        self.receiver.close()
        self._pool.shutdown()


class DecodeFollower:
    """Rank r > 0 of a tensor-parallel decode worker: runs rank 0's steps and receives its
    KV heads into the blocks rank 0 reserved. A RankPort in process."""

    def __init__(
        self,
        model_dir: str | Path,
        engine_config: EngineConfig,
        kv_backend: str,
        host: str,
        tp_rank: int,
        dist_init: str,
        *,
        kv_secret: bytes,
    ):
        self.engine = LLMEngine(model_dir, engine_config, tp_rank=tp_rank, dist_init=dist_init)
        self.receiver = KVReceiver(
            kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout, secret=kv_secret, host=host
        )
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}  # parts not settled yet
        self._thread = threading.Thread(target=self.engine.follow, name=f"decode-rank-{tp_rank}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def expect(self, request_id: str, block_ids: Sequence[int], timeout_s: float) -> Future[Settled]:
        transfer, settled = expect_part(self.receiver, request_id, block_ids, timeout_s)
        with self._lock:
            self._transfers[request_id] = transfer
        settled.add_done_callback(lambda _f: self._forget(request_id, transfer))
        return settled

    def _forget(self, request_id: str, transfer: Transfer) -> None:
        with self._lock:
            if self._transfers.get(request_id) is transfer:
                del self._transfers[request_id]

    def cancel(self, request_id: str, reason: str) -> None:
        with self._lock:
            transfer = self._transfers.get(request_id)
        if transfer is not None:
            transfer.cancel(reason)

    def num_transfers(self) -> int:
        with self._lock:
            return len(self._transfers)

    def close(self) -> None:
        """After rank 0's close(): wait for the follow loop to end, then free everything."""
        self._thread.join()
        self.engine.close()
        self.receiver.close()

"""The state of one request's KV move, as each side sees it, and the deadline clock.

    PENDING ──▶ TRANSFERRING ──▶ DONE
       │             │
       └─────────────┴──────▶ FAILED | CANCELLED

A state change is visible at once through `state`, `wait()`, `wait_async()` and
`add_done_callback()`. Giving the
blocks back is a separate, later event (`blocks_released`, `on_release`): after a failure a
peer may still be writing, and blocks are handed back only once it no longer can.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import threading
import time
from collections.abc import Callable

from kv_transfer.messages import Channel, Message

Outbox = list[tuple[Channel, Message]]  # messages decided under an owner's lock


class TransferState(enum.Enum):
    PENDING = "pending"  # registered; no byte has moved yet
    TRANSFERRING = "transferring"  # the peer accepted; layers are moving
    DONE = "done"  # every layer landed (receiver) or was confirmed by the receiver (sender)
    FAILED = "failed"  # error, deadline, lost peer or the peer's abort: see Transfer.error
    CANCELLED = "cancelled"  # this side called cancel()

    @property
    def is_terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.CANCELLED)


class Transfer:
    """One request's KV move on one side. Thread-safe; created by KVSender.start or KVReceiver.expect.

    `block_ids` are this side's blocks and their ownership is explicit:

    - sender: the source blocks must stay allocated until `blocks_released`; the transport
      may read them until then. Released once after DONE, FAILED or CANCELLED.
    - receiver: the reserved blocks. On DONE they hold the request's KV and stay with the
      request (never released here). On FAILED or CANCELLED they are released once no
      sender can write them any more; until then they must stay reserved.

    `on_release()` runs once when the blocks are handed back, on a kv_transfer thread (or
    inside start() for a transfer that fails there): keep it short, e.g. enqueue the request
    to the block manager's thread. The owner knows which blocks: it named them.
    """

    def __init__(
        self,
        transfer_id: str,
        block_ids: tuple[int, ...],
        on_release: Callable[[], None] | None,
        cancel: Callable[[str, str], None],
    ):
        self.transfer_id = transfer_id
        self.block_ids = block_ids
        self._on_release = on_release
        self._cancel = cancel
        self._cond = threading.Condition()
        self._state = TransferState.PENDING
        self._error: str | None = None
        self._layers_done: list[int] = []
        self._finished_s: float | None = None
        self._released = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[TransferState]]] = []
        self._callbacks: list[Callable[[Transfer], None]] = []

    def __repr__(self) -> str:
        return f"Transfer({self.transfer_id!r}, {self._state.value}, error={self._error!r})"

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def error(self) -> str | None:
        """Why the transfer failed or was cancelled; None otherwise."""
        return self._error

    @property
    def finished_s(self) -> float | None:
        """time.monotonic() when the state became terminal (for metrics); None before."""
        return self._finished_s

    @property
    def layers_done(self) -> tuple[int, ...]:
        """Layers complete, in completion order: written to every receiver (sender), or
        arrived from every sender (receiver)."""
        with self._cond:
            return tuple(self._layers_done)

    @property
    def blocks_released(self) -> bool:
        return self._released

    def wait(self, timeout_s: float | None = None) -> TransferState:
        """Block until the state is terminal or `timeout_s` passed; returns the state."""
        with self._cond:
            self._cond.wait_for(lambda: self._state.is_terminal, timeout_s)
            return self._state

    def wait_released(self, timeout_s: float | None = None) -> bool:
        """Block until the blocks were handed back or `timeout_s` passed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._released, timeout_s)

    async def wait_async(self) -> TransferState:
        """Await a terminal state from an asyncio loop, without tying up a thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TransferState] = loop.create_future()
        with self._cond:
            if self._state.is_terminal:
                return self._state
            self._waiters.append((loop, future))
        return await future

    def add_done_callback(self, callback: Callable[[Transfer], None]) -> None:
        """Call `callback(self)` once the state is terminal: at once if it is already, else on
        the thread that ends the transfer (keep it short)."""
        with self._cond:
            if not self._state.is_terminal:
                self._callbacks.append(callback)
                return
        callback(self)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the transfer: CANCELLED here, FAILED on the peer. No effect once terminal."""
        self._cancel(self.transfer_id, reason)

    # The methods below are called by the owning KVSender or KVReceiver only.

    def _moving(self) -> None:
        with self._cond:
            if self._state is TransferState.PENDING:
                self._state = TransferState.TRANSFERRING

    def _layer_done(self, layer_idx: int) -> None:
        with self._cond:
            self._layers_done.append(layer_idx)

    def _finish(self, state: TransferState, error: str | None = None) -> bool:
        """Move to a terminal state; False (and no change) if already terminal."""
        assert state.is_terminal
        with self._cond:
            if self._state.is_terminal:
                return False
            self._state, self._error = state, error
            self._finished_s = time.monotonic()
            waiters, self._waiters = self._waiters, []
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future, state)
        for callback in callbacks:
            callback(self)
        return True

    def _release(self) -> None:
        """Hand the blocks back. The owner calls it once, without holding its own lock."""
        assert self._state.is_terminal and not self._released
        try:
            if self._on_release is not None:
                self._on_release()
        finally:
            with self._cond:
                self._released = True
                self._cond.notify_all()


def deliver(outbox: Outbox, released: list[Transfer]) -> None:
    """Send the messages and hand back the blocks that a state change decided.

    Owners decide under their lock and deliver after releasing it: a slow socket must not
    stall the owner, and on_release callbacks may call back into it.
    """
    for channel, msg in outbox:
        channel.send(msg)
    for handle in released:
        handle._release()


def _resolve(future: asyncio.Future[TransferState], state: TransferState) -> None:
    if not future.done():
        future.set_result(state)


class DeadlineClock:
    """One thread that calls `expire(key)` once each key's monotonic deadline has passed.

    A thread per transfer would cost a thread per in-flight request; this costs one per
    sender or receiver. Keys whose transfer already ended are simply ignored by `expire`.
    """

    def __init__(self, expire: Callable[[str], None], name: str):
        self._expire = expire
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()  # breaks ties so that keys are never compared
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, key: str, deadline: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), key))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, key = heapq.heappop(self._heap)
            self._expire(key)

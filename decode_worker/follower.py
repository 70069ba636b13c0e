"""A follower rank of a decode worker, and what rank 0 and its followers say to each other.

Rank 0 (decode_worker/worker.py DecodeWorker) owns the scheduler and the block ids; every rank
r > 0 (DecodeFollower) runs rank 0's steps and has its own KV receiver on its own cache, which
holds the same block ids. At a turn rank 0's payload carries its Orders (blocks to register,
parts to cancel, migrations to send), and each follower answers with a RankReport of what
happened since its last one (worker.py's docstring tells the whole protocol).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from engine import EngineConfig, LLMEngine
from kv_transfer import KVReceiver, KVSender, Transfer, TransferState

# How one rank's part of a transfer ended, once its blocks are safe: (state, error).
Settled = tuple[TransferState, str | None]


@dataclass(frozen=True)
class Orders:
    """What rank 0 tells its followers at a turn."""

    register: tuple[tuple[str, tuple[int, ...], float], ...] = ()  # (request id, block ids, timeout_s)
    cancel: tuple[tuple[str, str], ...] = ()  # (request id, reason)
    # Migrations out: (request id, transfer id, block ids, endpoints, timeout_s) to send its heads of.
    send: tuple[tuple[str, str, tuple[int, ...], tuple[str, ...], float], ...] = ()
    stop_send: tuple[tuple[str, str], ...] = ()  # (request id, reason): cancel that rank's send


@dataclass(frozen=True)
class RankReport:
    """What a follower tells rank 0 when asked: what happened since its last report."""

    refused: tuple[tuple[str, str], ...] = ()  # registrations it could not make: (request id, why)
    settled: tuple[tuple[str, TransferState, str | None], ...] = ()  # (request id, state, error)
    sent: tuple[tuple[str, TransferState, str | None], ...] = ()  # sends that let go of the blocks: (id, state, error)


def expect_part(
    receiver: KVReceiver,
    request_id: str,
    block_ids: Sequence[int],
    timeout_s: float,
    on_settled: Callable[[Settled], None],
) -> Transfer:
    """Register one rank's part with its receiver; on_settled gets its Settled, once."""
    once = threading.Lock()

    def settle(state: TransferState, error: str | None) -> None:
        if once.acquire(blocking=False):
            on_settled((state, error))

    transfer = receiver.expect(
        request_id, block_ids, timeout_s, on_release=lambda: settle(transfer.state, transfer.error)
    )

    def on_done(t: Transfer) -> None:
        # DONE releases nothing (the blocks stay with the request) and no sender writes after it.
        if t.state is TransferState.DONE:
            settle(t.state, None)

    transfer.add_done_callback(on_done)
    return transfer


class DecodeFollower:
    """Rank r > 0 of a tensor-parallel decode worker: runs rank 0's steps, registers the blocks
    rank 0 orders and receives its KV heads into them, and reports how its parts settle."""

    def __init__(
        self,
        model_dir: str | Path,
        engine_config: EngineConfig,
        kv_backend: str,
        host: str,
        rank: int,
        dist_init: str,
        *,
        kv_secret: bytes,
    ):
        self.engine = LLMEngine(model_dir, engine_config, rank=rank, dist_init=dist_init)
        self.receiver = KVReceiver(
            kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout, secret=kv_secret, host=host
        )
        assert self.engine.group is not None
        self.engine.group.gather(self.endpoint)  # rank 0 learns where this rank receives
        self.kv_backend = kv_backend
        self._kv_secret = kv_secret
        self._sender: KVSender | None = None  # for migrations out, made on first use
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}  # parts not settled yet
        self._refused: list[tuple[str, str]] = []  # since the last report
        self._settled: list[tuple[str, TransferState, str | None]] = []  # since the last report
        self._sends: dict[str, Transfer] = {}  # migrations' parts still reading the blocks
        self._sent: list[tuple[str, TransferState, str | None]] = []  # let go since the last report
        self._thread = threading.Thread(
            target=self.engine.follow, args=(self._on_step, self._report), name=f"decode-rank-{rank}", daemon=True
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def _on_step(self, orders: Orders | None) -> None:
        """The follow loop's thread: carry out rank 0's orders (no per-layer hook: we receive)."""
        if orders is None:
            return
        for request_id, block_ids, timeout_s in orders.register:
            try:
                transfer = expect_part(
                    self.receiver, request_id, block_ids, timeout_s, partial(self._on_settled, request_id)
                )
            except Exception as exc:  # e.g. the id is still in use here: rank 0 fails the request
                with self._lock:
                    self._refused.append((request_id, str(exc)))
                continue
            with self._lock:  # unless it settled already (reports run on this thread: not yet sent)
                if all(r != request_id for r, _, _ in self._settled):
                    self._transfers[request_id] = transfer
        for request_id, reason in orders.cancel:
            with self._lock:
                part = self._transfers.get(request_id)
            if part is not None:
                part.cancel(reason)
        for request_id, transfer_id, block_ids, endpoints, timeout_s in orders.send:
            self._send(request_id, transfer_id, block_ids, endpoints, timeout_s)
        for request_id, reason in orders.stop_send:
            with self._lock:
                part = self._sends.get(request_id)
            if part is not None:
                part.cancel(reason)

    def _send(self, request_id: str, transfer_id: str, block_ids, endpoints, timeout_s: float) -> None:
        """This rank's part of a migration out (Orders.send): push its heads of every layer,
        all in place; how it lets go of the blocks goes in the next report."""
        if self._sender is None:
            layout = self.engine.kv_cache.layout
            self._sender = KVSender(self.kv_backend, self.engine.kv_cache.tensor, layout, secret=self._kv_secret)
        started: list[Transfer] = []
        early: list[bool] = []  # it let go inside start(), before started was set

        def on_release() -> None:
            with self._lock:
                self._sends.pop(request_id, None)
                if not started:
                    early.append(True)
                    return
                self._sent.append((request_id, started[0].state, started[0].error))

        try:
            part = self._sender.start(transfer_id, block_ids, endpoints, timeout_s, on_release)
        except Exception as exc:  # never started: nothing reads the blocks here
            with self._lock:
                self._sent.append((request_id, TransferState.FAILED, f"could not start: {exc}"))
            return
        with self._lock:
            started.append(part)
            if early:
                self._sent.append((request_id, part.state, part.error))
            else:
                self._sends[request_id] = part
        for layer in self.engine.kv_cache.layout.layers:
            self._sender.push_layer(transfer_id, layer)

    def _on_settled(self, request_id: str, settled: Settled) -> None:
        with self._lock:
            self._transfers.pop(request_id, None)
            self._settled.append((request_id, *settled))

    def _report(self) -> RankReport:
        with self._lock:
            report = RankReport(tuple(self._refused), tuple(self._settled), tuple(self._sent))
            self._refused, self._settled, self._sent = [], [], []
        return report

    def num_transfers(self) -> int:
        """This rank's parts not settled yet."""
        with self._lock:
            return len(self._transfers)

    def close(self) -> None:
        """After rank 0's close(): wait for the follow loop to end, then free everything."""
        self._thread.join()
        self.engine.close()
        self.receiver.close()
        if self._sender is not None:
            self._sender.close()

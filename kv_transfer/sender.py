"""Prefill side: push a request's KV, layer by layer, into blocks a decode worker reserved.

One transfer on the sender:

 1. start(id, src_block_ids, endpoints): handshake with the decode ranks (once per rank, kept
    open), pick those whose KV heads overlap ours, send each a Begin. State PENDING.
 2. Accept(id, dst_block_ids) from a receiver: that link may now write. State TRANSFERRING.
 3. push_layer(id, layer) after the model stored a layer: queued on every link; each link's
    worker thread writes it (SendLink.write_layer), then sends LayerSent.
 4. Confirm(id) from every receiver: DONE, and the source blocks are released.
 On cancel(), the deadline, a receiver's Abort or a lost link: FAILED or CANCELLED at once, the
 other receivers get an Abort, and the source blocks are released once no link worker reads
 them any more. A link's channel closes only after its worker stopped writing, so a receiver
 that sees the connection drop knows this sender no longer touches its blocks.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kv_transfer.auth import AuthenticationError, check_secret, new_nonce, proof, verify
from kv_transfer.blocks import check_block_ids
from kv_transfer.handshake import PROTOCOL_VERSION, HandshakeError
from kv_transfer.messages import (
    MAX_HANDSHAKE_BYTES,
    Abort,
    Accept,
    Begin,
    Challenge,
    Channel,
    Confirm,
    Hello,
    LayerSent,
    Message,
    Quiesced,
    Refuse,
    Rendezvous,
    Welcome,
    parse_endpoint,
)
from kv_transfer.registry import load_backend
from kv_transfer.resharding import peers_of, rank_key, shared_heads
from kv_transfer.transfer import DeadlineClock, Outbox, Transfer, TransferState, deliver
from kv_transfer.transport import SendLink, TransportError
from proto.kv import KVLayout

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Link:
    """The connection to one receiver rank."""

    endpoint: str
    channel: Channel
    layout: KVLayout  # the receiver's
    data: SendLink | None  # None when the two ranks share no head or no layer: nothing to move
    # (transfer id, layer, ready event) to write, or None to stop
    jobs: queue.SimpleQueue[tuple[str, int, torch.cuda.Event | None] | None] = field(default_factory=queue.SimpleQueue)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    writing: str | None = None  # the transfer whose bytes the worker is moving right now
    alive: bool = True
    threads: list[threading.Thread] = field(default_factory=list)


@dataclass(eq=False)
class _Part:
    """One transfer on one link."""

    link: _Link
    dst_block_ids: np.ndarray | None = None  # from Accept; nothing is written before
    stopping: bool = False  # this link is done with the transfer (confirmed, failed, aborted)
    owed: Message | None = None  # Abort or Quiesced to send once the worker stopped writing
    quiet: bool = False  # the worker will not read the source blocks for this transfer again


@dataclass(eq=False)
class _Outgoing:
    handle: Transfer
    src_block_ids: np.ndarray
    parts: list[_Part]
    deadline: float
    timeout_s: float
    pushed: set[int] = field(default_factory=set)
    written: dict[int, int] = field(default_factory=dict)  # layer -> links that wrote it
    confirmed: int = 0


class KVSender:
    """The prefill worker's end of KV transfers for one cache (one rank: a TP rank of a pipeline stage).

    The cache tensor stays owned by the caller (engine KVCache); the sender only reads the
    blocks of running transfers. Thread-safe; callbacks run on kv_transfer threads.
    """

    def __init__(
        self, backend: str, cache: torch.Tensor, layout: KVLayout, *, secret: bytes, connect_timeout_s: float = 30.0
    ):
        """secret: the deployment's (kv_transfer/auth.py); receivers without it are refused."""
        self.backend = backend
        self.layout = layout
        self.connect_timeout_s = connect_timeout_s
        self._secret = check_secret(secret)
        self._transport = load_backend(backend)(cache, layout, "send", self._secret)
        self._on_gpu = cache.is_cuda
        self._lock = threading.Lock()
        self._accepted = threading.Condition(self._lock)
        self._links: dict[str, _Link] = {}
        self._transfers: dict[str, _Outgoing] = {}
        self._closed = False
        self._clock = DeadlineClock(self._expire, name="kv-send-deadlines")

    def connect(self, endpoint: str) -> KVLayout:
        """Handshake with the receiver at `endpoint` (once; the link is kept) and return its layout.

        Raises HandshakeError naming every mismatch, or OSError when it cannot be reached.
        start() connects on demand; calling this at start-up keeps that off the prefill path.
        """
        return self._link(endpoint).layout

    def start(
        self,
        transfer_id: str,
        src_block_ids: Sequence[int],
        endpoints: Sequence[str],
        timeout_s: float,
        on_release: Callable[[], None] | None = None,
    ) -> Transfer:
        """Begin moving a request's KV from `src_block_ids` to the decode group at `endpoints`.

        `endpoints` are the receivers of every rank of the decode worker (from its
        reservation); the sender writes to those whose heads and layers overlap its own. The source
        blocks must stay allocated until the transfer's blocks are released (`on_release`).
        Unreachable or incompatible receivers give a FAILED transfer, not an exception.
        """
        ids = check_block_ids(src_block_ids, self.layout.num_blocks, "src_block_ids")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        deadline = time.monotonic() + timeout_s
        handle = Transfer(transfer_id, tuple(ids.tolist()), on_release, self._cancel)
        with self._lock:
            if self._closed or transfer_id in self._transfers:
                raise RuntimeError(f"sender closed or transfer {transfer_id!r} already running")
        try:
            links = self._plan([self._link(endpoint) for endpoint in endpoints])
        except (OSError, HandshakeError, TransportError) as e:
            handle._finish(TransferState.FAILED, f"cannot reach the decode group: {e}")
            handle._release()
            return handle
        out = _Outgoing(handle, ids, [_Part(link) for link in links], deadline, timeout_s)
        with self._lock:
            if self._closed or transfer_id in self._transfers:  # while we were connecting
                raise RuntimeError(f"sender closed or transfer {transfer_id!r} already running")
            self._transfers[transfer_id] = out
            outbox: Outbox = [(part.link.channel, Begin(transfer_id, len(ids))) for part in out.parts]
            lost = [part.link for part in out.parts if not part.link.alive]
            if lost:
                outbox = self._fail(out, TransferState.FAILED, f"receiver at {lost[0].endpoint} disconnected")
            released = self._settle(out)
        deliver(outbox, released)
        self._clock.add(transfer_id, deadline)
        return handle

    def push_layer(self, transfer_id: str, layer_idx: int) -> None:
        """Queue one layer of a transfer; called right after the model stored that layer's K/V.

        Returns at once: link workers move the bytes while the next layer computes. A no-op
        once the transfer ended (say the decode side cancelled), so a prefill can finish its
        forward pass without checking. On a GPU the layer's kernels may still be running: the
        workers wait for an event recorded here, on the caller's current stream.
        """
        if layer_idx not in self.layout.layers:
            raise ValueError(
                f"layer_idx must be one of this rank's layers [{self.layout.layer_start}, "
                f"{self.layout.layer_end}), got {layer_idx}"
            )
        with self._lock:
            out = self._transfers.get(transfer_id)
            if out is None or out.handle.state.is_terminal:
                return
            if layer_idx in out.pushed:
                raise ValueError(f"layer {layer_idx} of transfer {transfer_id!r} was already pushed")
            out.pushed.add(layer_idx)
            ready = None
            if self._on_gpu:
                ready = torch.cuda.Event()
                ready.record()
            for part in out.parts:
                if layer_idx in part.link.layout.layers:
                    part.link.jobs.put((transfer_id, layer_idx, ready))

    def close(self) -> None:
        """Fail running transfers, stop every link once its worker is idle, free the backend."""
        with self._lock:
            self._closed = True
            links = list(self._links.values())
        for link in links:  # fails every running transfer: each has a part on some link
            self._lose(link, "sender closed")
        for link in links:
            for thread in link.threads:
                thread.join()
        self._clock.close()
        self._transport.close()

    # Connections.

    def _link(self, endpoint: str) -> _Link:
        with self._lock:
            link = self._links.get(endpoint)
            if link is not None and link.alive:
                return link
        link = self._open(endpoint)
        with self._lock:
            current = self._links.get(endpoint)
            if self._closed or (current is not None and current.alive):
                link.alive = False
            else:
                self._links[endpoint] = link
        if not link.alive:  # closed meanwhile, or another thread connected first
            self._close_link(link)
            if self._closed:
                raise ConnectionError("sender closed")
            return self._link(endpoint)
        link.threads = [
            threading.Thread(target=target, args=(link,), daemon=True, name=f"kv-send-{kind}-{endpoint}")
            for kind, target in (("reader", self._read), ("worker", self._work))
        ]
        for thread in link.threads:
            thread.start()
        return link

    def _open(self, endpoint: str) -> _Link:
        channel = Channel.connect(endpoint, self.connect_timeout_s)
        try:
            challenge = channel.recv(timeout_s=self.connect_timeout_s, max_bytes=MAX_HANDSHAKE_BYTES)
            if not isinstance(challenge, Challenge):
                raise ConnectionError(f"receiver at {endpoint} sent no Challenge (got {type(challenge).__name__})")
            nonce = new_nonce()
            channel.send(
                Hello(
                    self.layout,
                    self.backend,
                    PROTOCOL_VERSION,
                    nonce,
                    proof(self._secret, "hello", challenge.nonce, nonce),
                )
            )
            reply = channel.recv(timeout_s=self.connect_timeout_s)
            if isinstance(reply, Refuse):
                raise HandshakeError(f"receiver at {endpoint} refused: {reply.reason}")
            if not isinstance(reply, Welcome):
                raise ConnectionError(f"receiver at {endpoint} sent no Welcome (got {type(reply).__name__})")
            if not verify(self._secret, reply.proof, "welcome", nonce, challenge.nonce):
                raise AuthenticationError(f"receiver at {endpoint} does not hold this deployment's KV secret")
            peer = reply.layout
            heads = shared_heads(self.layout, peer)
            data = None
            if heads is not None:
                data = self._transport.open_send_link(
                    parse_endpoint(endpoint)[0],
                    peer,
                    reply.transport_info,
                    heads,
                    reply.link_id,
                    Rendezvous(channel, self.connect_timeout_s),
                )
        except BaseException:
            channel.close()
            raise
        return _Link(endpoint, channel, peer, data)

    def _plan(self, links: list[_Link]) -> list[_Link]:
        """The links this rank writes to: one per decode rank that holds some of our heads
        of some of our layers."""
        groups = {(link.layout.tp_size, link.layout.layer_bounds) for link in links}
        if len(groups) != 1:
            shapes = sorted(f"tp {tp} layer_bounds {bounds}" for tp, bounds in groups)
            raise HandshakeError(f"endpoints must be the ranks of one decode worker, got {shapes}")
        ((dst_tp_size, dst_bounds),) = groups
        by_rank = {rank_key(link.layout): link for link in links}
        needed = peers_of(self.layout, dst_tp_size, dst_bounds)
        missing = [rank for rank in needed if rank not in by_rank]
        if missing:
            raise HandshakeError(
                f"no endpoint for decode rank(s) {missing} (stage, TP rank) of a worker with tp "
                f"{dst_tp_size} and layer_bounds {dst_bounds}, which hold KV of prefill rank "
                f"{rank_key(self.layout)}"
            )
        return [by_rank[rank] for rank in needed]

    # Link threads.

    def _read(self, link: _Link) -> None:
        while (msg := link.channel.recv()) is not None:
            match msg:
                case Accept():
                    self._on_accept(link, msg)
                case Confirm():
                    self._on_confirm(link, msg)
                case Abort():
                    self._on_abort(link, msg)
                case _:  # nothing else may come from a receiver
                    break
        self._lose(link, f"receiver at {link.endpoint} disconnected")

    def _work(self, link: _Link) -> None:
        try:
            while (job := link.jobs.get()) is not None:
                self._write(link, *job)
        finally:
            # Only now, with no write in flight, may the receiver learn that this link is gone.
            self._close_link(link)

    def _write(self, link: _Link, transfer_id: str, layer_idx: int, ready: torch.cuda.Event | None) -> None:
        if ready is not None:
            ready.synchronize()  # the layer's K/V are in the cache only once its kernels ran
        with self._lock:
            found = self._find(transfer_id, link)
            if found is None:
                return
            out, part = found
            while part.dst_block_ids is None and not part.stopping and link.alive and time.monotonic() < out.deadline:
                self._accepted.wait(out.deadline - time.monotonic())
            dst_block_ids = part.dst_block_ids
            if dst_block_ids is None or part.stopping or not link.alive:
                return
            link.writing = transfer_id
            msg = LayerSent(transfer_id, layer_idx, next(link.seq))
        data = link.data
        assert data is not None, "_plan keeps only links that share heads"
        error = None
        try:
            if data.two_sided:  # the receiver must post its receive before the bytes come
                link.channel.send(msg)
            data.write_layer(layer_idx, out.src_block_ids, dst_block_ids, msg.seq, out.deadline)
            if not data.two_sided:  # one-sided: announce only what already landed
                link.channel.send(msg)
        except Exception as e:  # any backend failure breaks the link, never the worker
            error = f"{self.backend} write to {link.endpoint} failed: {e}"
        with self._lock:
            link.writing = None
            if error is None and not part.stopping:
                out.written[layer_idx] = out.written.get(layer_idx, 0) + 1
                if out.written[layer_idx] == sum(layer_idx in p.link.layout.layers for p in out.parts):
                    out.handle._layer_done(layer_idx)
            outbox: Outbox = self._quiet(part) if part.stopping else []
            released = self._settle(out)
        deliver(outbox, released)
        if error is not None:
            log.warning("%s", error)
            self._lose(link, error)

    def _close_link(self, link: _Link) -> None:
        if link.data is not None:
            link.data.close()
        link.channel.close()

    # State changes. Methods taking `outbox` or returning one run under self._lock.

    def _on_accept(self, link: _Link, msg: Accept) -> None:
        with self._lock:
            found = self._find(msg.transfer_id, link)
            if found is None or found[1].stopping:
                return
            out, part = found
            try:
                dst = check_block_ids(msg.dst_block_ids, link.layout.num_blocks, "dst_block_ids")
                if dst.size != out.src_block_ids.size:
                    raise ValueError(f"receiver reserved {dst.size} blocks for {out.src_block_ids.size} source blocks")
            except ValueError as e:
                outbox = self._fail(out, TransferState.FAILED, f"bad Accept from {link.endpoint}: {e}")
            else:
                part.dst_block_ids, outbox = dst, []
                out.handle._moving()
                self._accepted.notify_all()
            released = self._settle(out)
        deliver(outbox, released)

    def _on_confirm(self, link: _Link, msg: Confirm) -> None:
        with self._lock:
            found = self._find(msg.transfer_id, link)
            if found is None or found[1].stopping:
                return
            out, part = found
            out.confirmed += 1
            outbox = self._stop(part, msg.transfer_id, None)
            if out.confirmed == len(out.parts):
                out.handle._finish(TransferState.DONE)
            released = self._settle(out)
        deliver(outbox, released)

    def _on_abort(self, link: _Link, msg: Abort) -> None:
        with self._lock:
            found = self._find(msg.transfer_id, link)
            if found is None:
                return
            out, part = found
            outbox = self._stop(part, msg.transfer_id, Quiesced(msg.transfer_id))
            outbox += self._fail(out, TransferState.FAILED, f"receiver at {link.endpoint} aborted: {msg.reason}")
            released = self._settle(out)
        deliver(outbox, released)

    def _expire(self, transfer_id: str) -> None:
        self._end(
            transfer_id,
            TransferState.FAILED,
            lambda out: (
                f"deadline of {out.timeout_s:g}s passed with {len(out.pushed)} "
                f"of {self.layout.num_layers} layers pushed"
            ),
        )

    def _cancel(self, transfer_id: str, reason: str) -> None:
        self._end(transfer_id, TransferState.CANCELLED, lambda out: reason)

    def _end(self, transfer_id: str, state: TransferState, reason: Callable[[_Outgoing], str]) -> None:
        with self._lock:
            out = self._transfers.get(transfer_id)
            if out is None:
                return
            outbox = self._fail(out, state, reason(out))
            released = self._settle(out)
        deliver(outbox, released)

    def _lose(self, link: _Link, reason: str) -> None:
        with self._lock:
            if not link.alive:
                return
            link.alive = False
            if self._links.get(link.endpoint) is link:
                del self._links[link.endpoint]
            self._accepted.notify_all()
            outbox: Outbox = []
            released: list[Transfer] = []
            for out in list(self._transfers.values()):
                found = self._find(out.handle.transfer_id, link)
                if found is not None:
                    part = found[1]
                    outbox += self._stop(part, out.handle.transfer_id, None)
                    outbox += self._fail(out, TransferState.FAILED, reason)
                    released += self._settle(out)
        link.jobs.put(None)
        deliver(outbox, released)

    def _find(self, transfer_id: str, link: _Link) -> tuple[_Outgoing, _Part] | None:
        """The running transfer and its part on `link`; None when there is no such part."""
        out = self._transfers.get(transfer_id)
        part = next((p for p in out.parts if p.link is link), None) if out is not None else None
        return (out, part) if out is not None and part is not None else None

    def _fail(self, out: _Outgoing, state: TransferState, reason: str) -> Outbox:
        if not out.handle._finish(state, reason):
            return []
        outbox: Outbox = []
        for part in out.parts:
            outbox += self._stop(part, out.handle.transfer_id, Abort(out.handle.transfer_id, reason))
        return outbox

    def _stop(self, part: _Part, transfer_id: str, owed: Message | None) -> Outbox:
        """This link is done with the transfer; it turns quiet once its worker is not writing."""
        if part.stopping:
            return []
        part.stopping, part.owed = True, owed
        self._accepted.notify_all()  # a worker waiting for this part's Accept can give up now
        return [] if part.link.writing == transfer_id else self._quiet(part)

    def _quiet(self, part: _Part) -> Outbox:
        if part.quiet:
            return []
        part.quiet = True
        return [(part.link.channel, part.owed)] if part.owed and part.link.alive else []

    def _settle(self, out: _Outgoing) -> list[Transfer]:
        """Once terminal and every link is quiet, forget the transfer; its blocks go back."""
        tid = out.handle.transfer_id
        if out.handle.state.is_terminal and all(part.quiet for part in out.parts) and self._transfers.get(tid) is out:
            del self._transfers[tid]
            return [out.handle]
        return []

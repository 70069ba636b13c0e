"""Decode side: receive a request's KV into blocks this worker reserved.

One transfer on the receiver:

 1. expect(id, dst_block_ids, timeout_s): the decode worker reserved the blocks in its block
    manager and registers them here before the prefill starts. State PENDING.
 2. Begin(id) from each prefill rank that holds some of our heads of our layers: answered with
    Accept(dst_block_ids); from then on that sender may write. State TRANSFERRING.
 3. LayerSent(id, layer) from each sender: the layer's bytes are in place (two-sided
    backends receive them now). A layer is done when every expected sender sent it.
 4. Every layer done: DONE, Confirm to each sender. The blocks now hold the request's KV
    and stay with the request.
 On cancel(), the deadline, a sender's Abort or a lost sender: FAILED or CANCELLED at once and
 Abort to the other senders. The reserved blocks are released only when every accepted sender
 is quiet (answered Quiesced, aborted itself, or its connection closed): a block is never
 handed back while a sender may still write it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kv_transfer.auth import check_secret, new_nonce, proof, verify
from kv_transfer.blocks import check_block_ids
from kv_transfer.handshake import HandshakeError, check_compatible
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
    Quiesced,
    Refuse,
    Rendezvous,
    Welcome,
)
from kv_transfer.registry import load_backend
from kv_transfer.resharding import RankKey, rank_key, senders_by_layer, shared_heads
from kv_transfer.transfer import DeadlineClock, Outbox, Transfer, TransferState, deliver
from kv_transfer.transport import RecvLink
from proto.kv import KVLayout

log = logging.getLogger(__name__)
MAX_HANDSHAKES = 16  # connections proving themselves at once
MAX_LINKS = 256  # authenticated senders at once (one per prefill rank that sends here)


@dataclass(eq=False)
class _Link:
    """The connection from one sender rank."""

    channel: Channel
    layout: KVLayout  # the sender's
    data: RecvLink | None  # None when the two ranks share no head or no layer: nothing to receive
    alive: bool = True


@dataclass(eq=False)
class _Part:
    """One transfer from one sender rank."""

    link: _Link
    layers: set[int] = field(default_factory=set)
    quiet: bool = False  # this sender will not write the reserved blocks again


@dataclass(eq=False)
class _Incoming:
    handle: Transfer
    dst_block_ids: np.ndarray
    deadline: float
    timeout_s: float
    # per layer of ours, the sender ranks that hold it and some of our heads; set by the first Begin
    expected: dict[int, frozenset[RankKey]] | None = None
    src_group: tuple[int, tuple[int, ...]] | None = None  # the senders' (tp_size, layer_bounds)
    parts: dict[RankKey, _Part] = field(default_factory=dict)  # by sender (stage, TP rank)


class KVReceiver:
    """The decode worker's end of KV transfers for one cache (one rank: a TP rank of a stage).

    Listens at `endpoint` for senders. The cache tensor stays owned by the caller; senders
    write only into blocks registered with expect().
    """

    def __init__(
        self,
        backend: str,
        cache: torch.Tensor,
        layout: KVLayout,
        *,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        handshake_timeout_s: float = 10.0,
        max_handshakes: int = MAX_HANDSHAKES,
        max_links: int = MAX_LINKS,
    ):
        """secret: the deployment's (kv_transfer/auth.py); only senders holding it are served.
        Listens on `host` only. At most max_handshakes connections may be proving themselves
        at once (each for at most handshake_timeout_s, reading at most MAX_HANDSHAKE_BYTES),
        and at most max_links authenticated ones may be open; others are closed on arrival."""
        self.backend = backend
        self.layout = layout
        self.handshake_timeout_s = handshake_timeout_s
        self._secret = check_secret(secret)
        self.max_handshakes, self.max_links = max_handshakes, max_links
        self._transport = load_backend(backend)(cache, layout, "recv", self._secret)
        self._server = socket.create_server((host, port))
        bound = self._server.getsockname()[1]
        self.endpoint = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._num_handshakes = 0  # connections not authenticated yet
        self._threads: list[threading.Thread] = []
        self._transfers: dict[str, _Incoming] = {}
        self._closed = False
        self._clock = DeadlineClock(self._expire, name="kv-recv-deadlines")
        self._acceptor = threading.Thread(target=self._accept, name="kv-recv-accept", daemon=True)
        self._acceptor.start()

    def expect(
        self,
        transfer_id: str,
        dst_block_ids: Sequence[int],
        timeout_s: float,
        on_release: Callable[[], None] | None = None,
    ) -> Transfer:
        """Register blocks reserved for a request's KV; senders may write them once they Begin.

        Call before the prefill starts: a Begin for an unknown id is refused. On DONE the
        blocks hold the KV and stay with the request; on FAILED or CANCELLED they are
        released through `on_release`, once no sender can write them any more.
        """
        ids = check_block_ids(dst_block_ids, self.layout.num_blocks, "dst_block_ids")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        handle = Transfer(transfer_id, tuple(ids.tolist()), on_release, self._cancel)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed or transfer_id in self._transfers:
                raise RuntimeError(f"receiver closed or transfer {transfer_id!r} expected twice")
            self._transfers[transfer_id] = _Incoming(handle, ids, deadline, timeout_s)
        self._clock.add(transfer_id, deadline)
        return handle

    def close(self) -> None:
        """Shut down: fail running transfers, drop every sender, free the backend."""
        with self._lock:
            self._closed = True
            links = list(self._links)
        self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone may not
        self._server.close()
        self._acceptor.join()
        for link in links:
            link.channel.close()  # readers wake up, see the connection gone and fail transfers
        for thread in list(self._threads):
            thread.join()
        with self._lock:
            outbox, released = [], []
            for inc in list(self._transfers.values()):
                outbox += self._fail(inc, TransferState.FAILED, "receiver closed")
                released += self._settle(inc)
        deliver(outbox, released)
        self._clock.close()
        self._transport.close()

    # Connection threads.

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:  # the server socket was closed
                return
            thread = threading.Thread(target=self._serve, args=(Channel(sock),), daemon=True, name="kv-recv-link")
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                full = self._num_handshakes >= self.max_handshakes or len(self._links) >= self.max_links
                if not full:
                    self._num_handshakes += 1
                    self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            if full:  # nothing is read from, or kept for, a connection over the limits
                log.warning(
                    "KV receiver %s: refusing a connection (%d handshakes, %d links open)",
                    self.endpoint,
                    self._num_handshakes,
                    len(self._links),
                )
                sock.close()
                continue
            thread.start()

    def _serve(self, channel: Channel) -> None:
        try:
            link = self._handshake(channel)
        finally:
            with self._lock:
                self._num_handshakes -= 1
        if link is None:
            channel.close()
            return
        reason = f"sender rank {rank_key(link.layout)} disconnected"
        try:
            while (msg := channel.recv()) is not None:
                match msg:
                    case Begin():
                        self._on_begin(link, msg)
                    case LayerSent():
                        self._on_layer(link, msg)
                    case Quiesced():
                        self._on_quiesced(link, msg)
                    case Abort():
                        self._on_abort(link, msg)
                    case _:
                        reason = f"sender rank {rank_key(link.layout)} sent an unexpected {msg!r}"
                        break
        except Exception as e:  # a backend read failed: the link is broken
            reason = f"{self.backend} read from sender rank {rank_key(link.layout)} failed: {e}"
            log.warning("%s", reason)
        channel.close()
        if link.data is not None:
            link.data.close()
        self._lose(link, reason)

    def _handshake(self, channel: Channel) -> _Link | None:
        """Challenge the peer; only one that proves it holds the secret gets more than the
        nonce, and only a bounded Hello is read from it before it has."""
        challenge = new_nonce()
        channel.send(Challenge(challenge))
        hello = channel.recv(timeout_s=self.handshake_timeout_s, max_bytes=MAX_HANDSHAKE_BYTES)
        if not isinstance(hello, Hello) or not verify(self._secret, hello.proof, "hello", challenge, hello.nonce):
            if isinstance(hello, Hello):
                channel.send(Refuse("authentication failed: the sender does not hold this deployment's KV secret"))
            return None
        try:
            check_compatible(hello.layout, self.layout, hello.backend, self.backend, hello.protocol)
        except HandshakeError as e:
            channel.send(Refuse(str(e)))
            return None
        heads = shared_heads(hello.layout, self.layout)
        link_id = uuid.uuid4().hex
        channel.send(
            Welcome(
                self.layout,
                link_id,
                self._transport.local_info(),
                proof(self._secret, "welcome", hello.nonce, challenge),
            )
        )
        try:
            rendezvous = Rendezvous(channel, self.handshake_timeout_s)
            data = self._transport.open_recv_link(hello.layout, heads, link_id, rendezvous) if heads else None
        except Exception as e:
            log.warning("cannot open a %s link to sender rank %s: %s", self.backend, rank_key(hello.layout), e)
            return None
        link = _Link(channel, hello.layout, data)
        with self._lock:
            if self._closed:
                return None
            self._links.append(link)
        return link

    # State changes. Methods taking `outbox` or returning one run under self._lock.

    def _on_begin(self, link: _Link, msg: Begin) -> None:
        sender = link.layout
        with self._lock:
            inc = self._transfers.get(msg.transfer_id)
            outbox: Outbox = []
            released: list[Transfer] = []
            if inc is None:
                reason = "no blocks reserved for this transfer (unknown, ended or expired)"
            elif inc.handle.state.is_terminal:
                reason = f"transfer already {inc.handle.state.value}: {inc.handle.error}"
            elif link.data is None:
                reason = f"sender rank {rank_key(sender)} holds none of this receiver's heads of its layers"
            elif msg.num_blocks != inc.dst_block_ids.size:
                reason = f"sender has {msg.num_blocks} blocks, receiver reserved {inc.dst_block_ids.size}"
            elif inc.src_group not in (None, (sender.tp_size, sender.layer_bounds)):
                reason = (
                    f"prefill rank with tp {sender.tp_size} and layer_bounds {sender.layer_bounds} differs from "
                    f"the ranks before (tp {inc.src_group[0]}, layer_bounds {inc.src_group[1]})"
                )
            elif rank_key(sender) in inc.parts:
                reason = f"sender rank {rank_key(sender)} began this transfer twice"
            else:
                reason = None
                inc.src_group = (sender.tp_size, sender.layer_bounds)
                inc.expected = senders_by_layer(self.layout, sender.tp_size, sender.layer_bounds)
                inc.parts[rank_key(sender)] = _Part(link)
                inc.handle._moving()
                outbox.append((link.channel, Accept(msg.transfer_id, tuple(inc.dst_block_ids.tolist()))))
            if reason is not None:
                outbox.append((link.channel, Abort(msg.transfer_id, reason)))
                if inc is not None:
                    outbox += self._fail(inc, TransferState.FAILED, reason)
                    released += self._settle(inc)
        deliver(outbox, released)

    def _on_layer(self, link: _Link, msg: LayerSent) -> None:
        with self._lock:
            inc = self._transfers.get(msg.transfer_id)
            part = inc.parts.get(rank_key(link.layout)) if inc is not None else None
            if (
                inc is None
                or part is None
                or part.link is not link
                or part.quiet
                or msg.layer_idx in part.layers
                or rank_key(link.layout) not in (inc.expected or {}).get(msg.layer_idx, ())
            ):
                raise ValueError(f"unexpected {msg!r}")  # a sender bug: drop the link
            expected = inc.expected
        data = link.data
        assert data is not None and expected is not None, "only a Begin on a link with our heads makes a part"
        # Two-sided backends receive here; the blocks stay reserved meanwhile because this
        # part is not quiet, even if the transfer already failed.
        data.read_layer(msg.layer_idx, inc.dst_block_ids, msg.seq, inc.deadline)
        with self._lock:
            part.layers.add(msg.layer_idx)
            handle = inc.handle
            outbox: Outbox = []
            if handle.state.is_terminal:
                return
            if all(r in inc.parts and msg.layer_idx in inc.parts[r].layers for r in expected[msg.layer_idx]):
                handle._layer_done(msg.layer_idx)
            if len(handle.layers_done) == self.layout.num_layers:
                handle._finish(TransferState.DONE)
                for p in inc.parts.values():
                    p.quiet = True
                    outbox.append((p.link.channel, Confirm(msg.transfer_id)))
                del self._transfers[msg.transfer_id]
        deliver(outbox, [])

    def _on_quiesced(self, link: _Link, msg: Quiesced) -> None:
        self._quiet(link, msg.transfer_id, None)

    def _on_abort(self, link: _Link, msg: Abort) -> None:
        self._quiet(link, msg.transfer_id, f"sender rank {rank_key(link.layout)} aborted: {msg.reason}")

    def _quiet(self, link: _Link, transfer_id: str, failure: str | None) -> None:
        """This sender will not write the transfer's blocks again; fail it if `failure`."""
        with self._lock:
            inc = self._transfers.get(transfer_id)
            part = inc.parts.get(rank_key(link.layout)) if inc is not None else None
            if inc is None or part is None or part.link is not link:
                return
            part.quiet = True
            outbox = self._fail(inc, TransferState.FAILED, failure) if failure else []
            released = self._settle(inc)
        deliver(outbox, released)

    def _lose(self, link: _Link, reason: str) -> None:
        with self._lock:
            link.alive = False
            self._links.remove(link)
            outbox: Outbox = []
            released: list[Transfer] = []
            for inc in list(self._transfers.values()):
                part = inc.parts.get(rank_key(link.layout))
                if part is not None and part.link is link:
                    # The sender closes its connection only once it stopped writing (or died).
                    part.quiet = True
                    outbox += self._fail(inc, TransferState.FAILED, reason)
                    released += self._settle(inc)
        deliver(outbox, released)

    def _expire(self, transfer_id: str) -> None:
        self._end(
            transfer_id,
            TransferState.FAILED,
            lambda inc: (
                f"deadline of {inc.timeout_s:g}s passed with "
                f"{len(inc.handle.layers_done)} of {self.layout.num_layers} layers in"
            ),
        )

    def _cancel(self, transfer_id: str, reason: str) -> None:
        self._end(transfer_id, TransferState.CANCELLED, lambda inc: reason)

    def _end(self, transfer_id: str, state: TransferState, reason: Callable[[_Incoming], str]) -> None:
        with self._lock:
            inc = self._transfers.get(transfer_id)
            if inc is None:
                return
            outbox = self._fail(inc, state, reason(inc))
            released = self._settle(inc)
        deliver(outbox, released)

    def _fail(self, inc: _Incoming, state: TransferState, reason: str) -> Outbox:
        if not inc.handle._finish(state, reason):
            return []
        return [
            (p.link.channel, Abort(inc.handle.transfer_id, reason))
            for p in inc.parts.values()
            if not p.quiet and p.link.alive
        ]

    def _settle(self, inc: _Incoming) -> list[Transfer]:
        """Once failed and every accepted sender is quiet, forget the transfer; release its blocks."""
        state = inc.handle.state
        if not state.is_terminal or state is TransferState.DONE or not all(p.quiet for p in inc.parts.values()):
            return []
        if self._transfers.get(inc.handle.transfer_id) is not inc:
            return []
        del self._transfers[inc.handle.transfer_id]
        return [inc.handle]

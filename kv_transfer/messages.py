"""Control messages between a sender and a receiver, and the TCP channel that carries them.

Bytes of KV never travel here: only the handshake, block ids and progress. One connection
per (sender, receiver) pair, opened by the sender; both sides prove they hold the
deployment's secret before anything else (kv_transfer/auth.py)::

    sender                                receiver
                                  ◀──     Challenge(nonce)
      Hello(layout, backend, proof) ──▶   verify the proof, check_compatible
                                  ◀──     Welcome(layout, transport info, proof) | Refuse(reason)
      StoreSet(key, value)        ◀─▶     (backends that rendezvous: torch_dist's process group)
      Begin(id, num_blocks)       ──▶     match with expect(id, dst_block_ids)
                                  ◀──     Accept(id, dst_block_ids) | Abort(id, reason)
      LayerSent(id, layer, seq)   ──▶     (one per layer, after its bytes landed; two-sided
      ...                                  transports send it first and the receiver reads)
                                  ◀──     Confirm(id)            all my layers arrived
    on failure, either side:
      Abort(id, reason)           ◀─▶     the other side fails the transfer
      Quiesced(id)                ──▶     answer to the receiver's Abort: no more writes

A sender sends Abort and Quiesced only once it no longer touches the transfer's memory; the
receiver releases blocks only after every sender that was accepted is quiet (kv_transfer/receiver.py).

Messages are JSON, not pickle, so that a peer can never make this process run code.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass

from proto.kv import KVLayout

# Far above any real message (the largest, an Accept of a long prompt's block ids, is tens of
# KiB); bounds what an authenticated peer can make a reader allocate.
MAX_MESSAGE_BYTES = 16 << 20
# What a receiver reads from a peer that has not proven itself yet: one Hello, a few hundred bytes.
MAX_HANDSHAKE_BYTES = 4 << 10


@dataclass(frozen=True)
class Challenge:
    """Receiver -> sender, first on a connection: prove you hold the secret, over this nonce."""

    nonce: bytes


@dataclass(frozen=True)
class Hello:
    """Sender -> receiver, answering the Challenge."""

    layout: KVLayout  # the sender's cache
    backend: str  # registry name of the sender's transport
    protocol: int  # the sender's handshake.PROTOCOL_VERSION
    nonce: bytes  # the sender's own challenge to the receiver
    proof: bytes  # auth.proof(secret, "hello", challenge nonce, nonce)


@dataclass(frozen=True)
class Welcome:
    """Receiver -> sender: the handshake passed."""

    layout: KVLayout  # the receiver's cache
    link_id: str  # unique name of this connection
    transport_info: bytes  # the receiver transport's local_info(): how to reach its cache
    proof: bytes  # auth.proof(secret, "welcome", hello nonce, challenge nonce)


@dataclass(frozen=True)
class StoreSet:
    """Either way while a link opens: one key of a backend's two-party rendezvous."""

    key: str
    value: bytes


@dataclass(frozen=True)
class Refuse:
    """Receiver -> sender: the handshake failed; the receiver closes the connection."""

    reason: str  # every mismatch, named


@dataclass(frozen=True)
class Begin:
    """Sender -> receiver: I will move this transfer's KV for my heads."""

    transfer_id: str
    num_blocks: int  # number of source blocks; must equal the receiver's reservation


@dataclass(frozen=True)
class Accept:
    """Receiver -> sender: go ahead; until now the sender writes nothing."""

    transfer_id: str
    dst_block_ids: tuple[int, ...]  # reserved blocks, in the order of the sender's blocks


@dataclass(frozen=True)
class LayerSent:
    """Sender -> receiver: one layer of this transfer is in place (or, two-sided, coming)."""

    transfer_id: str
    layer_idx: int
    seq: int  # number of this message on the link; two-sided transports tag the bytes with it


@dataclass(frozen=True)
class Confirm:
    """Receiver -> sender: every layer from this sender arrived; its blocks are free to go."""

    transfer_id: str


@dataclass(frozen=True)
class Abort:
    """Either way: the transfer failed or was cancelled on the sending side of this message."""

    transfer_id: str
    reason: str


@dataclass(frozen=True)
class Quiesced:
    """Sender -> receiver, answering Abort: this sender will not write the blocks again."""

    transfer_id: str


Message = Challenge | Hello | Welcome | StoreSet | Refuse | Begin | Accept | LayerSent | Confirm | Abort | Quiesced
_KINDS = {
    cls.__name__: cls
    for cls in (Challenge, Hello, Welcome, StoreSet, Refuse, Begin, Accept, LayerSent, Confirm, Abort, Quiesced)
}


def encode(msg: Message) -> bytes:
    body = {"kind": type(msg).__name__}
    for field in dataclasses.fields(msg):
        value = getattr(msg, field.name)
        if isinstance(value, KVLayout):
            value = dataclasses.asdict(value)
        elif isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        body[field.name] = value
    return json.dumps(body).encode()


def decode(data: bytes) -> Message:
    """The message in `data`; ValueError when it is not one of the messages above."""
    try:
        raw = json.loads(data)
        cls = _KINDS[raw["kind"]]
        kwargs = {}
        for field in dataclasses.fields(cls):
            value = raw[field.name]
            if field.type == "KVLayout":
                value = KVLayout(**value)
            elif field.type == "bytes":
                value = base64.b64decode(value, validate=True)
            elif field.type.startswith("tuple"):
                value = tuple(value)
            kwargs[field.name] = value
        return cls(**kwargs)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise ValueError(f"not a kv_transfer message: {e!r:.200}") from e


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' (or '[v6 host]:port') as (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    return host.strip("[]"), int(port)


class Channel:
    """One TCP connection carrying length-prefixed messages. send() is thread-safe."""

    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock = sock
        self._send_lock = threading.Lock()

    @property
    def local_host(self) -> str:
        host: str = self._sock.getsockname()[0]  # (host, port) for IPv4, (host, port, flow, scope) for IPv6
        return host

    @classmethod
    def connect(cls, endpoint: str, timeout_s: float) -> Channel:
        return cls(socket.create_connection(parse_endpoint(endpoint), timeout=timeout_s))

    def send(self, msg: Message) -> bool:
        """Send one message; False when the peer is gone (its reader sees that as EOF)."""
        data = encode(msg)
        try:
            with self._send_lock:
                self._sock.sendall(struct.pack("!I", len(data)) + data)
            return True
        except OSError:
            return False

    def recv(self, timeout_s: float | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> Message | None:
        """The next message; None when the connection closed, broke, carried garbage, a
        message longer than max_bytes (nothing is allocated for it) or `timeout_s` passed.
        Only one thread may receive on a channel."""
        try:
            self._sock.settimeout(timeout_s)
            header = self._recv_exactly(4)
            size = struct.unpack("!I", header)[0] if header else 0
            if not header or size > max_bytes:
                return None
            data = self._recv_exactly(size)
            return decode(data) if data is not None else None
        except (OSError, ValueError):
            return None

    def _recv_exactly(self, size: int) -> bytes | None:
        buf = bytearray(size)
        view = memoryview(buf)
        while view:
            n = self._sock.recv_into(view)
            if n == 0:
                return None
            view = view[n:]
        return bytes(buf)

    def close(self) -> None:
        # shutdown() first: it wakes a reader blocked in recv() on this socket, close() alone may not.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class Rendezvous:
    """A two-party key-value exchange over a channel, for a backend to meet its peer while a
    link opens (torch_dist's process group). Only usable before the link's reader starts:
    it receives on the channel itself."""

    def __init__(self, channel: Channel, timeout_s: float):
        self._channel = channel
        self._timeout_s = timeout_s
        self._values: dict[str, bytes] = {}

    def set(self, key: str, value: bytes) -> None:
        self._values[key] = value
        if not self._channel.send(StoreSet(key, value)):
            raise ConnectionError("the peer left during the rendezvous")

    def get(self, key: str) -> bytes:
        deadline = time.monotonic() + self._timeout_s
        while key not in self._values:
            remaining = deadline - time.monotonic()
            msg = self._channel.recv(timeout_s=max(remaining, 1e-3)) if remaining > 0 else None
            if not isinstance(msg, StoreSet):
                raise ConnectionError(
                    f"no rendezvous key {key!r} from the peer within {self._timeout_s:g} s (got {type(msg).__name__})"
                )
            self._values[msg.key] = msg.value
        return self._values[key]

    def has(self, key: str) -> bool:
        return key in self._values

    @property
    def local_host(self) -> str:
        """This side's address on the control connection: where the peer can reach it."""
        return self._channel.local_host

"""Control messages survive the wire, and a channel reports a closed peer as None."""

from __future__ import annotations

import socket
import threading

import pytest

from kv_transfer.messages import (
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
    StoreSet,
    Welcome,
    decode,
    encode,
    parse_endpoint,
)
from tests.kv_transfer.peer import make_layout

MESSAGES = [
    Challenge(b"\x01" * 16),
    Hello(make_layout(tp_rank=1, tp_size=2), "nixl", 2, b"n" * 16, b"p" * 32),
    Welcome(make_layout(), "abc", b"\x00\xffmetadata", b"p" * 32),
    StoreSet("0/1", b"\x00addr"),
    Refuse("dtype: ..."),
    Begin("req-1", 5),
    Accept("req-1", (4, 2, 9)),
    LayerSent("req-1", 3, 17),
    Confirm("req-1"),
    Abort("req-1", "deadline"),
    Quiesced("req-1"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b'{"kind": "Exec", "code": "rm"}',
        b'{"kind": "Begin", "transfer_id": "x"}',
        b"[" * 50_000 + b"]" * 50_000,
        b'{"kind": "Challenge", "nonce": "not base64!"}',
    ],
)
def test_anything_else_is_rejected(data):
    with pytest.raises(ValueError, match="not a kv_transfer message"):
        decode(data)


def test_channel_delivers_in_order_and_reports_eof():
    with socket.create_server(("127.0.0.1", 0)) as server:
        left = Channel.connect(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=5)
        right = Channel(server.accept()[0])
    sender = threading.Thread(target=lambda: [left.send(m) for m in MESSAGES])
    sender.start()
    assert [right.recv(timeout_s=5) for _ in MESSAGES] == MESSAGES
    sender.join()
    left.close()
    assert right.recv(timeout_s=5) is None
    right.send(Confirm("x"))  # never raises on a dead peer
    right.close()


def test_parse_endpoint():
    assert parse_endpoint("10.0.0.7:5555") == ("10.0.0.7", 5555)
    assert parse_endpoint("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="host:port"):
        parse_endpoint("nohost")

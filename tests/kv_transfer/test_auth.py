"""The KV data plane lets no one in who does not hold the deployment's secret, and a peer that
has not proven itself costs the receiver almost nothing."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading

import psutil
import pytest
import torch

from kv_transfer import AuthenticationError, KVReceiver, KVSender
from kv_transfer.auth import new_secret, proof, verify
from kv_transfer.backends.shm import DIR_PREFIX, remove_stale_dirs
from kv_transfer.messages import Challenge, Channel, Hello, Welcome
from tests.kv_transfer.peer import TEST_SECRET, make_layout


def cache_for(layout) -> torch.Tensor:
    return torch.zeros(layout.shape, dtype=getattr(torch, layout.dtype))


@pytest.fixture
def receiver():
    layout = make_layout()
    rx = KVReceiver("shm", cache_for(layout), layout, secret=TEST_SECRET, handshake_timeout_s=0.5, max_handshakes=4)
    yield rx
    rx.close()


def connect(endpoint: str) -> socket.socket:
    host, port = endpoint.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def closed_by_peer(sock: socket.socket, timeout_s: float = 10.0) -> bool:
    """Whether the peer closed the connection (after whatever it sent first)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_proofs_are_bound_to_secret_label_and_nonces():
    a, b = new_secret(), new_secret()
    p = proof(a, "hello", b"n1", b"n2")
    assert verify(a, p, "hello", b"n1", b"n2")
    assert not verify(b, p, "hello", b"n1", b"n2")
    assert not verify(a, p, "welcome", b"n1", b"n2")  # one side's proof is not the other's
    assert not verify(a, p, "hello", b"n2", b"n1")
    assert not verify(a, p, "hello", b"n1n", b"2")  # nonces are length-prefixed


def test_a_huge_length_header_before_authenticating_allocates_nothing(receiver):
    rss_before = psutil.Process().memory_info().rss
    socks = []
    for _ in range(100):
        sock = connect(receiver.endpoint)
        sock.sendall(struct.pack("!I", 64 << 20))  # "a 64 MiB message follows"
        socks.append(sock)
    for sock in socks:
        assert closed_by_peer(sock)
        sock.close()
    grown = psutil.Process().memory_info().rss - rss_before
    assert grown < 32 << 20, f"100 unauthenticated connections grew the receiver by {grown >> 20} MiB"


def test_connections_over_the_limit_are_closed_and_stalled_ones_time_out(receiver):
    idle = [connect(receiver.endpoint) for _ in range(receiver.max_handshakes)]
    for sock in idle:  # each gets its challenge, then says nothing
        assert isinstance(Channel(sock).recv(timeout_s=10), Challenge)
    extra = connect(receiver.endpoint)
    assert closed_by_peer(extra)  # no challenge, no thread: closed on arrival
    for sock in idle:
        assert closed_by_peer(sock)  # the handshake timeout
        sock.close()
    # Slots free again: a sender with the secret gets through.
    layout = make_layout()
    sender = KVSender("shm", cache_for(layout), layout, secret=TEST_SECRET)
    try:
        assert sender.connect(receiver.endpoint) == receiver.layout
    finally:
        sender.close()


def test_the_sender_refuses_a_receiver_that_cannot_prove_the_secret():
    layout = make_layout()
    with socket.create_server(("127.0.0.1", 0)) as server:

        def impostor():
            sock, _ = server.accept()
            channel = Channel(sock)
            channel.send(Challenge(b"c" * 16))
            hello = channel.recv(timeout_s=10)
            assert isinstance(hello, Hello)
            channel.send(Welcome(layout, "x", b"{}", b"\0" * 32))  # a proof it cannot make
            channel.recv(timeout_s=10)
            channel.close()

        thread = threading.Thread(target=impostor)
        thread.start()
        sender = KVSender("shm", cache_for(layout), layout, secret=TEST_SECRET)
        try:
            with pytest.raises(AuthenticationError, match="does not hold this deployment's KV secret"):
                sender.connect(f"127.0.0.1:{server.getsockname()[1]}")
        finally:
            sender.close()
            thread.join(10)


def test_torch_dist_opens_no_store_and_binds_only_the_given_address():
    layout = make_layout(dtype="float32")
    me = psutil.Process()
    before = {c.laddr for c in me.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    rx = KVReceiver("torch_dist", cache_for(layout), layout, secret=TEST_SECRET, host="127.0.0.1")
    tx = KVSender("torch_dist", cache_for(layout), layout, secret=TEST_SECRET)
    try:
        tx.connect(rx.endpoint)  # forms the link's Gloo group
        listening = {c.laddr for c in me.net_connections("tcp") if c.status == psutil.CONN_LISTEN} - before
        assert listening, "the receiver listens somewhere"
        assert all(addr.ip == "127.0.0.1" for addr in listening), listening
    finally:
        tx.close()
        rx.close()


def test_shm_hands_its_cache_fd_only_to_a_peer_with_the_secret():
    layout = make_layout()
    rx = KVReceiver("shm", cache_for(layout), layout, secret=TEST_SECRET)
    try:
        info_path = rx._transport._path
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(info_path)
            sock.recv(16)
            sock.sendall(b"\0" * 32)  # a wrong proof
            _, fds, _, _ = socket.recv_fds(sock, 16, 1)
        assert fds == []
    finally:
        rx.close()


def test_directories_of_dead_receivers_are_removed(tmp_path):
    dead = tmp_path / f"{DIR_PREFIX}999999999-abc"
    legacy = tmp_path / f"{DIR_PREFIX}abcdef"
    alive = tmp_path / f"{DIR_PREFIX}{os.getpid()}-abc"
    for d in (dead, legacy, alive):
        d.mkdir()
    removed = remove_stale_dirs(str(tmp_path))
    assert sorted(removed) == sorted([str(dead), str(legacy)]) and alive.exists()
    assert tempfile.gettempdir()  # the default root is the system's temp dir


def test_the_deployment_secret_comes_from_the_environment_or_is_new(monkeypatch):
    monkeypatch.delenv("TANDEM_KV_SECRET", raising=False)
    from kv_transfer.auth import deployment_secret

    assert deployment_secret() != deployment_secret()  # fresh each time when unset
    monkeypatch.setenv("TANDEM_KV_SECRET", "ab" * 32)
    assert deployment_secret() == bytes.fromhex("ab" * 32)
    monkeypatch.setenv("TANDEM_KV_SECRET", "x" * 40)  # Helm's randAlphaNum: not hex, long enough
    assert deployment_secret() == b"x" * 40
    monkeypatch.setenv("TANDEM_KV_SECRET", "short")
    with pytest.raises(ValueError, match="TANDEM_KV_SECRET must be hex or at least 32 characters"):
        deployment_secret()

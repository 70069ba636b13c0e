"""Fixtures that run every transfer test over every backend, in real processes.

`env` is one (backend, device) pair with the test process as a LocalPeer and two child Peers
kept for the whole session; `ends` builds senders and receivers in them and closes them after
each test. A backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kv_transfer import backend_names, load_backend
from tests.kv_transfer.peer import TEST_SECRET, LocalPeer, Peer, make_layout

BACKENDS = tuple(name for name in backend_names() if name != "slow_shm")
DEVICES = ("cpu", "cuda")


def skip_reason(backend: str, device: str) -> str | None:
    reason = load_backend(backend).unavailable_reason(device)
    if reason is None and backend == "torch_dist" and device == "cuda" and torch.cuda.device_count() < 2:
        reason = "NCCL cannot put both ranks of a link on one GPU, and there is only one"
    return reason


class Env:
    """One backend on one device, with a local side and two peer processes."""

    def __init__(self, backend: str, device: str):
        self.backend, self.device = backend, device
        self.local = LocalPeer()
        self.peers = [Peer(), Peer()]
        self._ids = itertools.count()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def layout(self, receiver: bool, **fields):
        """A test layout; on GPU the receiver takes the second device when there is one."""
        device = self.device
        if device == "cuda":
            device = f"cuda:{min(int(receiver), torch.cuda.device_count() - 1)}"
        return make_layout(device=device, **fields)

    def close(self) -> None:
        self.local.close()
        for peer in self.peers:
            peer.close()


@pytest.fixture(scope="session", params=[(b, d) for d in DEVICES for b in BACKENDS], ids=lambda p: f"{p[0]}-{p[1]}")
def env(request):
    backend, device = request.param
    reason = skip_reason(backend, device)
    if reason is not None:
        pytest.skip(f"{backend} on {device}: {reason}")
    env = Env(backend, device)
    yield env
    env.close()


class Ends:
    """Builds senders and receivers on any peer; everything built is closed after the test."""

    def __init__(self, env: Env):
        self.env = env
        self._built: list[tuple[object, str]] = []

    def receiver(self, peer, layout, backend: str | None = None, secret: bytes = TEST_SECRET) -> tuple[str, str]:
        name = self.env.new_id("rx")
        endpoint = peer.call("receiver", name, backend or self.env.backend, layout, secret)
        self._built.append((peer, name))
        return name, endpoint

    def sender(self, peer, layout, seed: int, backend: str | None = None, secret: bytes = TEST_SECRET) -> str:
        name = self.env.new_id("tx")
        peer.call("sender", name, backend or self.env.backend, layout, seed, secret)
        self._built.append((peer, name))
        return name

    def close(self) -> None:
        for peer, name in reversed(self._built):
            if not isinstance(peer, Peer) or peer.process.is_alive():
                peer.call("close", name)


@pytest.fixture
def ends(env):
    built = Ends(env)
    yield built
    built.close()

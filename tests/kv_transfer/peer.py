"""Test processes that hold KV senders, receivers and caches, driven over a pipe.

Every transfer test puts the sender and the receiver in different OS processes: the test
process runs one side in a LocalPeer, a child process (a Peer) the other. Both expose the
same `call(method, *args)` onto a Node, so a test reads the same whichever side is local.

Caches are filled from a seed with random bytes of every head of the model; a TP rank holds
its heads' slice, so a test can compute the bytes any receiver rank must end up with.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback

import numpy as np
import torch

from kv_transfer import KVReceiver, KVSender, Transfer, register_backend
from proto.kv import KVLayout

register_backend("slow_shm", "tests.kv_transfer.slow_backend:SlowShmTransport")

SCRIBBLE = 0x5A  # byte written over blocks after their release, as a new owner would
TEST_SECRET = b"tandem-tests-kv-secret-0123456789"  # the deployment secret every test peer holds


def make_layout(
    dtype: str = "bfloat16", tp_rank: int = 0, tp_size: int = 1, device: str = "cpu", **overrides
) -> KVLayout:
    fields = dict(
        model_id="tiny-llama@1",
        num_layers=4,
        total_num_kv_heads=4,
        num_kv_heads=4 // tp_size,
        head_dim=16,
        block_size=4,
        num_blocks=24,
        dtype=dtype,
        device=device,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )
    return KVLayout(**(fields | overrides))


def content(layout: KVLayout, seed: int) -> torch.Tensor:
    """Random bytes for every layer and head of the model: [L, 2, N, total heads, B, D], on the CPU."""
    heads = layout.total_num_kv_heads
    shape = (layout.total_num_layers, 2, layout.num_blocks, heads, layout.block_size, layout.head_dim)
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, layout.dtype)
    num_bytes = int(np.prod(shape)) * dtype.itemsize
    raw = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).view(shape)


def shard(full: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """The layers and heads of `full` that `layout`'s rank (TP rank of a stage) holds."""
    heads = slice(layout.head_offset, layout.head_offset + layout.num_kv_heads)
    return full[layout.layer_start : layout.layer_end, :, :, heads].contiguous()


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """Byte view for exact comparison: random bytes include NaNs, which never compare equal."""
    return tensor.contiguous().cpu().view(torch.uint8).numpy()


class Node:
    """What one process holds: caches, senders and receivers by name, transfers by id."""

    def __init__(self) -> None:
        self.caches: dict[str, torch.Tensor] = {}
        self.ends: dict[str, KVSender | KVReceiver] = {}
        self.transfers: dict[str, Transfer] = {}
        self.by_end: dict[tuple[str, str], Transfer] = {}  # (end name, transfer id): several ends here
        self.release_log: dict[str, dict] = {}

    def receiver(self, name: str, backend: str, layout: KVLayout, secret: bytes = TEST_SECRET) -> str:
        self.caches[name] = torch.zeros(layout.shape, dtype=getattr(torch, layout.dtype), device=layout.device)
        self.ends[name] = KVReceiver(backend, self.caches[name], layout, secret=secret)
        return self.ends[name].endpoint

    def sender(self, name: str, backend: str, layout: KVLayout, seed: int, secret: bytes = TEST_SECRET) -> None:
        self.caches[name] = shard(content(layout, seed), layout).to(layout.device)
        self.ends[name] = KVSender(backend, self.caches[name], layout, secret=secret)

    def connect(self, name: str, endpoint: str) -> None:
        self.ends[name].connect(endpoint)

    def expect(
        self, name: str, transfer_id: str, block_ids: list[int], timeout_s: float, scribble: bool = False
    ) -> None:
        self.transfers[transfer_id] = self.ends[name].expect(
            transfer_id, block_ids, timeout_s, self._on_release(name, transfer_id, tuple(block_ids), scribble)
        )
        self.by_end[(name, transfer_id)] = self.transfers[transfer_id]

    def start(
        self,
        name: str,
        transfer_id: str,
        block_ids: list[int],
        endpoints: list[str],
        timeout_s: float,
        scribble: bool = False,
    ) -> None:
        self.transfers[transfer_id] = self.ends[name].start(
            transfer_id,
            block_ids,
            endpoints,
            timeout_s,
            self._on_release(name, transfer_id, tuple(block_ids), scribble),
        )
        self.by_end[(name, transfer_id)] = self.transfers[transfer_id]

    def _on_release(self, name: str, transfer_id: str, block_ids: tuple[int, ...], scribble: bool):
        def on_release() -> None:
            # What the blocks held at the moment they were handed back, then (as the block
            # manager's next owner would) overwrite them.
            cache = self.caches[name]
            self.release_log[transfer_id] = {"block_ids": block_ids, "bytes": as_bytes(cache[:, :, list(block_ids)])}
            if scribble:
                cache[:, :, list(block_ids)] = torch.full_like(
                    cache[:, :, list(block_ids)].view(torch.uint8), SCRIBBLE
                ).view(cache.dtype)

        return on_release

    def push(self, name: str, transfer_id: str, layers: list[int]) -> None:
        for layer in layers:
            self.ends[name].push_layer(transfer_id, layer)

    def wait(self, transfer_id: str, timeout_s: float) -> dict:
        """The transfer's state once terminal (or at the timeout), with when it got there."""
        transfer = self.transfers[transfer_id]
        start = time.monotonic()
        transfer.wait(timeout_s)
        return self.status(transfer_id) | {"waited_s": time.monotonic() - start}

    def wait_layers(self, transfer_id: str, num_layers: int, timeout_s: float) -> dict:
        transfer = self.transfers[transfer_id]
        deadline = time.monotonic() + timeout_s
        while len(transfer.layers_done) < num_layers and not transfer.state.is_terminal and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.status(transfer_id)

    def wait_end(self, name: str, transfer_id: str, timeout_s: float) -> dict:
        """One end's transfer once terminal, and on a sender once its blocks are released (a
        receiver keeps the blocks of a finished transfer), or at the timeout."""
        transfer = self.by_end[(name, transfer_id)]
        transfer.wait(timeout_s)
        if isinstance(self.ends[name], KVSender):
            transfer.wait_released(timeout_s)
        return {"state": transfer.state.value, "error": transfer.error, "layers_done": transfer.layers_done}

    def wait_released(self, transfer_id: str, timeout_s: float) -> dict:
        self.transfers[transfer_id].wait_released(timeout_s)
        return self.status(transfer_id)

    def status(self, transfer_id: str) -> dict:
        transfer = self.transfers[transfer_id]
        return {
            "state": transfer.state.value,
            "error": transfer.error,
            "layers_done": transfer.layers_done,
            "released": transfer.blocks_released,
            "release_log": self.release_log.get(transfer_id),
        }

    def cancel(self, transfer_id: str, reason: str) -> None:
        self.transfers[transfer_id].cancel(reason)

    def blocks(self, name: str, block_ids: list[int]) -> np.ndarray:
        return as_bytes(self.caches[name][:, :, block_ids])

    def cache(self, name: str) -> np.ndarray:
        return as_bytes(self.caches[name])

    def close(self, name: str) -> None:
        self.ends.pop(name).close()


def _serve(conn) -> None:
    node = Node()
    while (request := conn.recv()) is not None:
        method, args, kwargs = request
        try:
            conn.send(("ok", getattr(node, method)(*args, **kwargs)))
        except Exception as e:
            conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    for name in list(node.ends):
        node.close(name)


class PeerError(RuntimeError):
    """A call raised in the peer process; the message carries its type, text and traceback."""


class LocalPeer:
    """The test process's own Node, with the same call() as a Peer."""

    def __init__(self) -> None:
        self.node = Node()

    def call(self, method: str, *args, **kwargs):
        return getattr(self.node, method)(*args, **kwargs)

    def close(self) -> None:
        for name in list(self.node.ends):
            self.node.close(name)


class Peer:
    """A Node in a child process. Calls time out rather than hang a test."""

    _context = None

    def __init__(self) -> None:
        if Peer._context is None:
            # A fork server that imported torch and kv_transfer once starts each peer in
            # milliseconds instead of re-importing torch for every process.
            Peer._context = mp.get_context("forkserver")
            Peer._context.set_forkserver_preload([__name__])
        self.conn, child = Peer._context.Pipe()
        self.process = Peer._context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def call(self, method: str, *args, timeout_s: float = 60.0, **kwargs):
        self.conn.send((method, args, kwargs))
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"peer did not answer {method} within {timeout_s}s")
        status, value = self.conn.recv()
        if status == "err":
            raise PeerError(value)
        return value

    def kill(self) -> None:
        """SIGKILL: the process dies mid-whatever, as a crashed worker would."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.kill()

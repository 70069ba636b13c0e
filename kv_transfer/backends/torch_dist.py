"""torch.distributed point to point: NCCL for a GPU cache, Gloo for a CPU cache.

Two-sided: for each layer the sender gathers the link's chunks into one contiguous staging
tensor and sends it; the receiver, told by LayerSent, receives into its own staging tensor
and scatters it into the reserved blocks::

    sender cache ─gather─▶ staging ══ send/recv, tag seq ══▶ staging ─scatter─▶ receiver cache

The sender keeps up to _MAX_IN_FLIGHT sends going: a layer's source blocks are free once
gathered, and waiting for each send before announcing the next layer would add a round of
thread wake-ups on both sides to every layer.

Each link is its own two-rank process group (rank 0 receiver, rank 1 sender). The ranks meet
through the link's authenticated control connection (messages.Rendezvous), not a TCPStore:
no store listens for anyone to read or write, and Gloo's own sockets bind the address each
side already uses to reach the other. The default process group is never touched, so
workers may use torch.distributed for tensor parallelism at the same time.
"""

from __future__ import annotations

import collections
import datetime
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kv_transfer.blocks import chunk_offsets, coalesce, copy_chunks, layer_chunk_ids
from kv_transfer.messages import Rendezvous
from kv_transfer.resharding import HeadSlice
from kv_transfer.transport import RecvLink, SendLink, Transport, TransportError
from proto.kv import KVLayout

_SETUP_TIMEOUT = datetime.timedelta(seconds=30)  # both ranks must join a link's group within it
_SENDER_RANK, _RECEIVER_RANK = 1, 0
_MAX_IN_FLIGHT = 4  # sends (and their staging tensors) a sender link keeps going at once


class _RendezvousStore(dist.Store):
    """The c10d Store the process group meets through: set/get/wait over the control connection
    (the only calls a two-rank Gloo or NCCL group makes while it forms)."""

    def __init__(self, rendezvous: Rendezvous):
        super().__init__()
        self._rendezvous = rendezvous

    def set(self, key: str, value: str | bytes) -> None:
        self._rendezvous.set(key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        return self._rendezvous.get(key)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        for key in keys:
            self._rendezvous.get(key)

    def check(self, keys: list[str]) -> bool:
        return all(self._rendezvous.has(key) for key in keys)


class _Link(SendLink, RecvLink):
    """Either end of one link; `two_sided` makes the sender announce each layer first."""

    two_sided = True

    def __init__(self, transport: TorchDistTransport, rendezvous: Rendezvous, rank: int, heads: HeadSlice):
        self._cache, self._layout = transport.cache, transport.layout
        self._device = transport.cache.device
        self._head_start = heads.src_head_start if rank == _SENDER_RANK else heads.dst_head_start
        self._num_heads = heads.num_heads
        self._peer = _RECEIVER_RANK if rank == _SENDER_RANK else _SENDER_RANK
        # (work, staging, deadline) of sends not yet known complete; staging must outlive them.
        self._in_flight: collections.deque[tuple[dist.Work, torch.Tensor, float]] = collections.deque()
        # A two-rank ProcessGroupNCCL or ProcessGroupGloo. torch's stubs leave out these backends'
        # send/recv and Gloo's options object, which the runtime has.
        self._group: Any
        store = _RendezvousStore(rendezvous)
        try:
            if self._device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = _SETUP_TIMEOUT
                self._group = dist.ProcessGroupNCCL(store, rank, 2, options)
            else:
                options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # see self._group
                options._timeout = _SETUP_TIMEOUT
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=rendezvous.local_host)]
                self._group = dist.ProcessGroupGloo(store, rank, 2, options)
        except (RuntimeError, ConnectionError) as e:
            raise TransportError(f"the link's process group did not form: {str(e).splitlines()[0]}") from e

    def write_layer(
        self, layer_idx: int, src_block_ids: np.ndarray, dst_block_ids: np.ndarray, seq: int, deadline: float
    ) -> None:
        staging = self._staging(src_block_ids.size)
        self._copy(layer_idx, src_block_ids, staging, to_cache=False)
        if self._device.type == "cuda":  # the gather must finish before the cache is released
            torch.cuda.current_stream(self._device).synchronize()
        self._in_flight.append((self._group.send([staging], self._peer, seq), staging, deadline))
        while len(self._in_flight) > _MAX_IN_FLIGHT:
            work, _, deadline = self._in_flight.popleft()
            self._wait(work, deadline)

    def read_layer(self, layer_idx: int, dst_block_ids: np.ndarray, seq: int, deadline: float) -> None:
        staging = self._staging(dst_block_ids.size)
        self._wait(self._group.recv([staging], self._peer, seq), deadline)
        self._copy(layer_idx, dst_block_ids, staging, to_cache=True)
        if self._device.type == "cuda":  # the layer must be in the cache before LayerSent counts
            torch.cuda.current_stream(self._device).synchronize()

    def _staging(self, num_blocks: int) -> torch.Tensor:
        # staging: [2 (K, V), num_blocks, num_heads, block_size, head_dim]
        return torch.empty(
            (2, num_blocks, self._num_heads, self._layout.block_size, self._layout.head_dim),
            dtype=self._cache.dtype,
            device=self._device,
        )

    def _copy(self, layer_idx: int, block_ids: np.ndarray, staging: torch.Tensor, to_cache: bool) -> None:
        """Gather the link's heads of a layer's blocks into staging, or scatter them back."""
        heads = slice(self._head_start, self._head_start + self._num_heads)
        if self._device.type == "cuda":
            ids = torch.from_numpy(block_ids).to(self._device)
            # [2, num_blocks, num_kv_heads, block_size, head_dim]
            layer = self._cache[layer_idx - self._layout.layer_start]
            if to_cache:
                layer[:, ids, heads] = staging
            else:
                staging.copy_(layer[:, ids, heads])
            return
        cache_offsets = chunk_offsets(
            self._layout, layer_chunk_ids(self._layout, layer_idx, block_ids), self._head_start
        )
        chunk_bytes = self._num_heads * self._layout.bytes_per_head_block
        staging_offsets = np.arange(cache_offsets.size, dtype=np.int64) * chunk_bytes
        cache_addr, staging_addr = self._cache.data_ptr(), staging.data_ptr()
        if to_cache:
            src, dst, lengths = coalesce(staging_offsets, cache_offsets, chunk_bytes)
            copy_chunks(cache_addr, dst, staging_addr, src, lengths)
        else:
            src, dst, lengths = coalesce(cache_offsets, staging_offsets, chunk_bytes)
            copy_chunks(staging_addr, dst, cache_addr, src, lengths)

    def _wait(self, work: dist.Work, deadline: float) -> None:
        remaining = max(deadline - time.monotonic(), 1e-3)
        try:
            work.wait(datetime.timedelta(seconds=remaining))
        except RuntimeError as e:  # Gloo and NCCL report timeouts and peer loss alike
            raise TransportError(str(e).splitlines()[0]) from e
        if self._device.type == "cuda":  # the staging tensor is freed right after
            torch.cuda.current_stream(self._device).synchronize()

    def close(self) -> None:
        try:
            while self._in_flight:
                work, _, deadline = self._in_flight.popleft()
                self._wait(work, deadline)
        except TransportError:
            pass  # the link is going away; its transfers already ended
        if self._device.type == "cuda":
            self._group.shutdown()


class TorchDistTransport(Transport):
    name = "torch_dist"

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        if torch.device(device).type == "cuda":
            if not torch.cuda.is_available():
                return "NCCL needs a CUDA device, and there is none"
            if not dist.is_nccl_available():
                return "this torch build has no NCCL"
        elif not dist.is_gloo_available():
            return "this torch build has no Gloo"
        return None

    def local_info(self) -> bytes:
        return b"{}"  # the peers meet over the control connection (messages.Rendezvous)

    def open_send_link(
        self,
        peer_host: str,
        peer_layout: KVLayout,
        peer_info: bytes,
        heads: HeadSlice,
        link_id: str,
        rendezvous: Rendezvous,
    ) -> SendLink:
        return _Link(self, rendezvous, _SENDER_RANK, heads)

    def open_recv_link(self, peer_layout: KVLayout, heads: HeadSlice, link_id: str, rendezvous: Rendezvous) -> RecvLink:
        return _Link(self, rendezvous, _RECEIVER_RANK, heads)

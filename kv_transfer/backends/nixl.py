"""NIXL over UCX: the sender WRITEs chunks straight into the receiver's registered cache.

Each side registers its whole cache once: DRAM on CPU, VRAM on GPU. The receiver's agent
metadata and cache address travel in the Welcome; the sender loads them and prepares two
descriptor lists per link, one entry per chunk (kv_transfer/blocks.py), each restricted to
the link's heads:

    local  dlist [chunk id] -> (my cache   + offset of the link's heads in it,   bytes, device)
    remote dlist [chunk id] -> (peer cache + offset of the link's heads in it,   bytes, device)

A layer is then one make_prepped_xfer("WRITE") with its blocks' chunk ids; NIXL merges
adjacent descriptors. The UCX plugin completes a WRITE only after flushing the endpoint, so
DONE at the sender means the bytes are in the receiver's memory; LayerSent follows.

Agents run without NIXL's progress thread: it spins a core at 100% even when idle (measured),
which on a small host starves the model. The sender makes progress itself while it polls its
WRITEs. The receiver's agent must answer UCX connection set-up (and, over transports without
one-sided puts such as plain TCP, every put), so a light thread progresses it every
millisecond; same-host CMA and RDMA WRITEs never wait for it.
"""

from __future__ import annotations

import importlib
import json
import struct
import threading
import time
import uuid
from types import ModuleType
from typing import Any

import numpy as np
import torch

from kv_transfer.blocks import all_chunk_offsets, layer_chunk_ids
from kv_transfer.messages import Rendezvous
from kv_transfer.resharding import HeadSlice
from kv_transfer.transport import RecvLink, Role, SendLink, Transport, TransportError
from proto.kv import KVLayout

_POLL_S = 100e-6  # between status checks of a running WRITE (each check makes UCX progress)
_RECV_PROGRESS_S = 1e-3  # between progress calls of a receiver's agent


def _nixl_api() -> ModuleType | None:
    """NIXL's Python API: from the `nixl` package, or from a CUDA-specific wheel installed alone."""
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _descriptors(base_addr: int, layout: KVLayout, heads_start: int, num_heads: int, device_id: int) -> np.ndarray:
    """One (address, bytes, device) row per chunk of the cache, for `num_heads` heads."""
    # descs: [num_layers * 2 * num_blocks, 3]
    descs = np.empty((layout.num_layers * 2 * layout.num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = all_chunk_offsets(layout, heads_start) + base_addr
    descs[:, 1] = num_heads * layout.bytes_per_head_block
    descs[:, 2] = device_id
    return descs


class NixlSendLink(SendLink):
    # local_dlist, remote_dlist: the agent's prepped descriptor lists (nixl ships no types).
    def __init__(
        self, transport: NixlTransport, remote: str, local_dlist: Any, remote_dlist: Any, dst_layout: KVLayout
    ):
        self._transport, self._agent = transport, transport.agent
        self._remote, self._local_dlist, self._remote_dlist = remote, local_dlist, remote_dlist
        self._src_layout, self._dst_layout = transport.layout, dst_layout

    def write_layer(
        self, layer_idx: int, src_block_ids: np.ndarray, dst_block_ids: np.ndarray, seq: int, deadline: float
    ) -> None:
        local = layer_chunk_ids(self._src_layout, layer_idx, src_block_ids).astype(np.int32)
        remote = layer_chunk_ids(self._dst_layout, layer_idx, dst_block_ids).astype(np.int32)
        handle = self._agent.make_prepped_xfer("WRITE", self._local_dlist, local, self._remote_dlist, remote)
        try:
            state = self._agent.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransportError(f"deadline passed during the WRITE of layer {layer_idx}")
                time.sleep(_POLL_S)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransportError(f"NIXL WRITE of layer {layer_idx} ended in {state}")
        finally:
            self._retire(handle)

    def _retire(self, handle: Any) -> None:
        # release() cancels a WRITE still in flight. If UCX cannot cancel it, wait until it
        # ends: returning earlier would let the receiver hand out blocks it may still reach.
        try:
            handle.release()
        except Exception:
            while self._agent.check_xfer_state(handle) == "PROC":
                time.sleep(_POLL_S)
            handle.release()

    def close(self) -> None:
        self._local_dlist.release()
        self._remote_dlist.release()
        self._transport.drop_remote(self._remote)


class NixlTransport(Transport):
    name = "nixl"

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        if _nixl_api() is None:
            return "NIXL is not installed (pip install 'tandem[nixl]', which brings nixl-cu12)"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return "a VRAM cache needs a CUDA device, and there is none"
        return None

    def __init__(self, cache: torch.Tensor, layout: KVLayout, role: Role, secret: bytes):
        super().__init__(cache, layout, role, secret)
        api = _nixl_api()
        assert api is not None, "Transport.__init__ checked unavailable_reason()"
        # STRICT: link workers, readers and connect() use the agent from several threads.
        config = api.nixl_agent_config(
            enable_prog_thread=False, backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
        )
        self.agent = api.nixl_agent(f"tandem-kv-{role}-{uuid.uuid4().hex}", config)
        if "UCX" not in self.agent.backends:
            raise TransportError("NIXL found no UCX plugin; the nixl backend needs UCX")
        self._mem_type = "VRAM" if cache.is_cuda else "DRAM"
        self._device_id = cache.device.index if cache.is_cuda else 0
        self._registered = self.agent.register_memory(cache)
        self._remotes: dict[str, int] = {}  # remote agent -> open links to it
        self._remotes_lock = threading.Lock()
        self._stop = threading.Event()
        if role == "recv":
            self._progress = threading.Thread(target=self._make_progress, daemon=True, name="kv-nixl-progress")
            self._progress.start()

    def _make_progress(self) -> None:
        while not self._stop.wait(_RECV_PROGRESS_S):
            self.agent.get_new_notifs()  # progresses the agent's UCX workers

    def local_info(self) -> bytes:
        header = json.dumps(
            {
                "agent": self.agent.name,
                "addr": self.cache.data_ptr(),
                "device_id": self._device_id,
                "mem_type": self._mem_type,
            }
        ).encode()
        metadata: bytes = self.agent.get_agent_metadata()
        return struct.pack("!I", len(header)) + header + metadata

    def open_send_link(
        self,
        peer_host: str,
        peer_layout: KVLayout,
        peer_info: bytes,
        heads: HeadSlice,
        link_id: str,
        rendezvous: Rendezvous,
    ) -> SendLink:
        (size,) = struct.unpack_from("!I", peer_info)
        info = json.loads(peer_info[4 : 4 + size])
        remote = info["agent"]
        with self._remotes_lock:
            if remote not in self._remotes:  # a second link to the same agent reuses its metadata
                self.agent.add_remote_agent(peer_info[4 + size :])
            self._remotes[remote] = self._remotes.get(remote, 0) + 1
        try:
            self.agent.make_connection(remote)  # now rather than on the first layer
            local = self.agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT",
                _descriptors(
                    self.cache.data_ptr(), self.layout, heads.src_head_start, heads.num_heads, self._device_id
                ),
                self._mem_type,
            )
            remote_dlist = self.agent.prep_xfer_dlist(
                remote,
                _descriptors(info["addr"], peer_layout, heads.dst_head_start, heads.num_heads, info["device_id"]),
                info["mem_type"],
            )
        except Exception as e:
            self.drop_remote(remote)
            raise TransportError(f"cannot prepare NIXL descriptors for {peer_host}: {e}") from e
        return NixlSendLink(self, remote, local, remote_dlist, peer_layout)

    def drop_remote(self, remote: str) -> None:
        with self._remotes_lock:
            self._remotes[remote] -= 1
            if self._remotes[remote] == 0:
                del self._remotes[remote]
                self.agent.remove_remote_agent(remote)

    def open_recv_link(self, peer_layout: KVLayout, heads: HeadSlice, link_id: str, rendezvous: Rendezvous) -> RecvLink:
        return RecvLink()  # one-sided: the sender's WRITE is the whole transfer

    def close(self) -> None:
        if self.role == "recv":
            self._stop.set()
            self._progress.join()
        self.agent.deregister_memory(self._registered)

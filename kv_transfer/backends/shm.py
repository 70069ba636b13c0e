"""Same-host shared memory: the sender copies each chunk straight into the receiver's cache.

    receiver process                          sender process
    cache storage in shm (fd) ──SCM_RIGHTS──▶ mmap(fd) ◀── memmove ── own cache

The receiver moves its cache storage into shared memory once, in place, when it is built (as
torch's share_memory_() does: the tensor and every view of it keep working). The sender maps
that memory and memmoves chunks into it: one copy per byte, like a plain copy, no staging.

The fd is handed over a Unix socket in a private directory (mode 0700), so only the same user
can reach it, and only to a peer that answers a challenge with the deployment's secret
(kv_transfer/auth.py), so only a worker of this deployment can map the cache. The socket's
path travels in the Welcome, after both sides authenticated. The Welcome also carries the
host's boot id: a sender on another host fails with a clear message rather than a missing
file. Directories left by receivers that died (kill -9 skips close()) are removed when the
next receiver starts.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import socket
import tempfile
import threading

import numpy as np
import torch

from kv_transfer.auth import NONCE_BYTES, new_nonce, proof, verify
from kv_transfer.blocks import chunk_offsets, coalesce, copy_chunks, layer_chunk_ids
from kv_transfer.messages import Rendezvous
from kv_transfer.resharding import HeadSlice
from kv_transfer.transport import RecvLink, Role, SendLink, Transport, TransportError
from proto.kv import KVLayout

DIR_PREFIX = "tandem-kv-shm-"
FD_HANDOUT_TIMEOUT_S = 5.0


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_dirs(root: str | None = None) -> list[str]:
    """Remove this user's socket directories whose receiver process is gone; returns them."""
    root = root or tempfile.gettempdir()
    removed = []
    for name in os.listdir(root):
        if not name.startswith(DIR_PREFIX):
            continue
        path = os.path.join(root, name)
        pid_text = name[len(DIR_PREFIX) :].split("-", 1)[0]
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except FileNotFoundError:
            continue
        # Directories named before pids were recorded, or whose pid is gone, are stale.
        if not pid_text.isdigit() or not _alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class ShmSendLink(SendLink):
    def __init__(
        self,
        src: torch.Tensor,
        src_layout: KVLayout,
        mapping: mmap.mmap,
        dst_offset: int,
        dst_layout: KVLayout,
        heads: HeadSlice,
    ):
        self._src_addr = src.data_ptr()
        self._src_layout, self._dst_layout, self._heads = src_layout, dst_layout, heads
        self._mapping = mapping
        self._anchor = ctypes.c_char.from_buffer(mapping)  # pins the mapping while we write
        self._dst_addr = ctypes.addressof(self._anchor) + dst_offset
        self._chunk_bytes = heads.num_heads * src_layout.bytes_per_head_block

    def write_layer(
        self, layer_idx: int, src_block_ids: np.ndarray, dst_block_ids: np.ndarray, seq: int, deadline: float
    ) -> None:
        src = chunk_offsets(
            self._src_layout, layer_chunk_ids(self._src_layout, layer_idx, src_block_ids), self._heads.src_head_start
        )
        dst = chunk_offsets(
            self._dst_layout, layer_chunk_ids(self._dst_layout, layer_idx, dst_block_ids), self._heads.dst_head_start
        )
        src, dst, lengths = coalesce(src, dst, self._chunk_bytes)
        copy_chunks(self._dst_addr, dst, self._src_addr, src, lengths)

    def close(self) -> None:
        del self._anchor
        self._mapping.close()


class ShmTransport(Transport):
    name = "shm"

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        if torch.device(device).type != "cpu":
            return "shm moves CPU memory only; use nixl or torch_dist for a GPU cache"
        return None

    def __init__(self, cache: torch.Tensor, layout: KVLayout, role: Role, secret: bytes):
        super().__init__(cache, layout, role, secret)
        if role == "recv":
            # Moves the storage into an fd-backed shm file in place, whatever torch's sharing
            # strategy (share_memory_() would follow it); a no-op when already there. The fd
            # belongs to the storage: it is handed out, never closed here.
            self._fd, self._nbytes = cache.untyped_storage()._share_fd_cpu_()
            remove_stale_dirs()
            self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
            self._path = os.path.join(self._dir, "cache.sock")
            self._fd_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._fd_server.bind(self._path)
            self._fd_server.listen()
            self._thread = threading.Thread(target=self._hand_out_fd, daemon=True, name="kv-shm-fd")
            self._thread.start()

    def _hand_out_fd(self) -> None:
        """The fd, to each connection that proves it holds the secret (one at a time: senders
        connect once per link, and a peer that stalls is dropped at FD_HANDOUT_TIMEOUT_S)."""
        while True:
            try:
                conn, _ = self._fd_server.accept()
            except OSError:  # closed
                return
            with conn:
                try:
                    conn.settimeout(FD_HANDOUT_TIMEOUT_S)
                    nonce = new_nonce()
                    conn.sendall(nonce)
                    claimed = _recv_exactly(conn, 32)
                    if verify(self.secret, claimed, "shm-fd", nonce, self._path.encode()):
                        socket.send_fds(conn, [b"kv"], [self._fd])
                except OSError:
                    continue

    def local_info(self) -> bytes:
        offset = self.cache.storage_offset() * self.cache.element_size()
        return json.dumps(
            {"boot_id": _boot_id(), "path": self._path, "nbytes": self._nbytes, "offset": offset}
        ).encode()

    def open_send_link(
        self,
        peer_host: str,
        peer_layout: KVLayout,
        peer_info: bytes,
        heads: HeadSlice,
        link_id: str,
        rendezvous: Rendezvous,
    ) -> SendLink:
        info = json.loads(peer_info)
        if info["boot_id"] != _boot_id():
            raise TransportError(
                f"shm needs sender and receiver on one host; the receiver at "
                f"{peer_host} runs on another (boot id {info['boot_id']})"
            )
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(FD_HANDOUT_TIMEOUT_S)
                sock.connect(info["path"])
                nonce = _recv_exactly(sock, NONCE_BYTES)
                sock.sendall(proof(self.secret, "shm-fd", nonce, info["path"].encode()))
                _, fds, _, _ = socket.recv_fds(sock, 16, 1)
        except OSError as e:
            raise TransportError(f"cannot reach the receiver's shared memory at {info['path']}: {e}") from e
        if not fds:
            raise TransportError(
                f"the receiver at {info['path']} sent no shared memory fd (it did not accept this sender's KV secret)"
            )
        try:
            mapping = mmap.mmap(fds[0], info["nbytes"])
        finally:
            os.close(fds[0])
        return ShmSendLink(self.cache, self.layout, mapping, info["offset"], peer_layout, heads)

    def open_recv_link(self, peer_layout: KVLayout, heads: HeadSlice, link_id: str, rendezvous: Rendezvous) -> RecvLink:
        return RecvLink()  # one-sided: the sender's memmove is the whole transfer

    def close(self) -> None:
        if self.role == "recv":
            self._fd_server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._fd_server.close()
            self._thread.join()
            shutil.rmtree(self._dir, ignore_errors=True)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        data += chunk
    return data

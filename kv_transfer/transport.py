"""The one interface every KV backend implements, and the registry that picks one by name.

A Transport is the data plane of one worker's cache: it only moves bytes. Everything else
(handshake, block ownership, states, deadlines, cancel) lives once in KVSender/KVReceiver,
so every backend behaves the same and passes the same conformance suite.

    KVSender ── control (TCP, authenticated, kv_transfer/messages.py) ── KVReceiver
       │                                                      │
    Transport(role="send")                          Transport(role="recv")
       └─ SendLink ─────── bytes of KV (backend) ───────▶ RecvLink

One link per (sender rank, receiver rank) pair whose KV heads overlap; it moves that pair's
HeadSlice of each layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np
import torch

from kv_transfer.messages import Rendezvous
from kv_transfer.resharding import HeadSlice
from proto.kv import KVLayout

Role = Literal["send", "recv"]


class TransportError(RuntimeError):
    """A backend failed to move bytes: the link is broken and gets closed."""


class SendLink(ABC):
    """Sender end of one link: writes layers into one receiver's cache."""

    # True when the receiver must take part in every layer (torch.distributed recv): the
    # sender then announces a layer before writing it, and the receiver calls read_layer.
    two_sided: ClassVar[bool] = False

    @abstractmethod
    def write_layer(
        self, layer_idx: int, src_block_ids: np.ndarray, dst_block_ids: np.ndarray, seq: int, deadline: float
    ) -> None:
        """Move this link's heads of one layer, K and V, src blocks -> dst blocks (paired in order).

        Called from the link's worker thread, one layer at a time. Returns once the source
        blocks are no longer read and, for one-sided links, the bytes are in the receiver's
        memory. Raises TransportError on failure or when the monotonic `deadline` passes.
        """

    def close(self) -> None:  # noqa: B027 (optional: a link that holds nothing keeps this no-op)
        """Free what the link holds. Called once, after the last write_layer returned."""


class RecvLink:
    """Receiver end of one link. One-sided backends need nothing here: they return a plain
    RecvLink(), whose methods do nothing."""

    def read_layer(self, layer_idx: int, dst_block_ids: np.ndarray, seq: int, deadline: float) -> None:
        """Two-sided links: receive the layer announced with `seq` into the dst blocks.

        Called from the link's reader thread, in the order the sender wrote the layers.
        Raises TransportError on failure or when the monotonic `deadline` passes.
        """

    def close(self) -> None:
        """Free what the link holds. Called once, after the last read_layer returned."""


class Transport(ABC):
    """A backend bound to one worker's cache tensor, in one role. Made by KVSender/KVReceiver."""

    name: ClassVar[str]

    def __init__(self, cache: torch.Tensor, layout: KVLayout, role: Role, secret: bytes):
        # KVLayout dtype names are torch attribute names ("bfloat16", ...).
        if tuple(cache.shape) != layout.shape or cache.dtype != getattr(torch, layout.dtype):
            raise ValueError(
                f"cache must be {layout.dtype} with shape {layout.shape} (the layout's), "
                f"got {cache.dtype} {tuple(cache.shape)}"
            )
        device = torch.device(layout.device)  # "cuda" names whichever GPU is current
        if (
            not cache.is_contiguous()
            or cache.device.type != device.type
            or device.index not in (None, cache.device.index)
        ):
            raise ValueError(
                f"cache must be contiguous on {layout.device}, got device "
                f"{cache.device}, contiguous={cache.is_contiguous()}"
            )
        if (reason := self.unavailable_reason(layout.device)) is not None:
            raise TransportError(reason)
        self.cache = cache
        self.layout = layout
        self.role = role
        self.secret = secret  # the deployment's: guards any side door the backend opens

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        """Why this backend cannot run for a cache on `device` here; None when it can."""
        return None

    @abstractmethod
    def local_info(self) -> bytes:
        """Receiver: what a sender needs to reach this cache. Sent in the Welcome."""

    @abstractmethod
    def open_send_link(
        self,
        peer_host: str,
        peer_layout: KVLayout,
        peer_info: bytes,
        heads: HeadSlice,
        link_id: str,
        rendezvous: Rendezvous,
    ) -> SendLink:
        """Sender: connect the data plane to a receiver that sent `peer_info`. `rendezvous`
        exchanges keys with the receiver over the authenticated control connection, while
        the receiver opens its end."""

    @abstractmethod
    def open_recv_link(self, peer_layout: KVLayout, heads: HeadSlice, link_id: str, rendezvous: Rendezvous) -> RecvLink:
        """Receiver: the matching end, opened right after the Welcome was sent."""

    def close(self) -> None:  # noqa: B027 (optional: a backend that holds nothing keeps this no-op)
        """Free the backend's resources. Called once, after every link was closed."""

"""KV transfer: push a request's KV cache, layer by layer, from a prefill worker into blocks a
decode worker reserved, over NIXL (UCX), torch.distributed (NCCL / Gloo) or shared memory.

    secret = new_secret()  # one per deployment, handed to every worker
    # decode worker, one per decode TP rank
    receiver = KVReceiver("nixl", kv_cache.tensor, kv_cache.layout, secret=secret, host=my_ip)
    t = receiver.expect(request_id, reserved_block_ids, timeout_s=10, on_release=free_blocks)
    await t.wait_async()  # DONE: admit the request; otherwise its blocks come back via on_release

    # prefill worker, one per prefill TP rank
    sender = KVSender("nixl", kv_cache.tensor, kv_cache.layout, secret=secret)
    t = sender.start(request_id, block_ids, decode_endpoints, timeout_s=10, on_release=free_blocks)
    engine.run(scheduled, on_layer_stored=lambda layer: sender.push_layer(request_id, layer))

docs/kv_transfer.md has the protocol, the ownership rules and measured bandwidth.

The backend registry (kv_transfer.registry) loads without torch; the rest is imported on
first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kv_transfer.registry import backend_names, load_backend, register_backend

if TYPE_CHECKING:
    from kv_transfer.auth import AuthenticationError, deployment_secret, new_secret
    from kv_transfer.handshake import HandshakeError
    from kv_transfer.receiver import KVReceiver
    from kv_transfer.resharding import HeadSlice, head_slice, head_slices
    from kv_transfer.sender import KVSender
    from kv_transfer.transfer import Transfer, TransferState
    from kv_transfer.transport import RecvLink, SendLink, Transport, TransportError

_LAZY = {
    "AuthenticationError": "kv_transfer.auth",
    "deployment_secret": "kv_transfer.auth",
    "new_secret": "kv_transfer.auth",
    "HandshakeError": "kv_transfer.handshake",
    "KVReceiver": "kv_transfer.receiver",
    "KVSender": "kv_transfer.sender",
    "HeadSlice": "kv_transfer.resharding",
    "head_slice": "kv_transfer.resharding",
    "head_slices": "kv_transfer.resharding",
    "Transfer": "kv_transfer.transfer",
    "TransferState": "kv_transfer.transfer",
    "RecvLink": "kv_transfer.transport",
    "SendLink": "kv_transfer.transport",
    "Transport": "kv_transfer.transport",
    "TransportError": "kv_transfer.transport",
}
__all__ = [
    "AuthenticationError",
    "HandshakeError",
    "HeadSlice",
    "KVReceiver",
    "KVSender",
    "RecvLink",
    "SendLink",
    "Transfer",
    "TransferState",
    "Transport",
    "TransportError",
    "backend_names",
    "deployment_secret",
    "head_slice",
    "head_slices",
    "load_backend",
    "new_secret",
    "register_backend",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kv_transfer' has no attribute {name!r}")

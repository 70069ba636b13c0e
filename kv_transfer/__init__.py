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
"""

from kv_transfer.auth import AuthenticationError, deployment_secret, new_secret
from kv_transfer.handshake import HandshakeError
from kv_transfer.receiver import KVReceiver
from kv_transfer.resharding import HeadSlice, head_slice, head_slices
from kv_transfer.sender import KVSender
from kv_transfer.transfer import Transfer, TransferState
from kv_transfer.transport import (RecvLink, SendLink, Transport, TransportError, backend_names,
                                   load_backend, register_backend)

__all__ = ["AuthenticationError", "HandshakeError", "HeadSlice", "KVReceiver", "KVSender", "RecvLink", "SendLink",
           "Transfer", "TransferState", "Transport", "TransportError", "backend_names",
           "deployment_secret", "head_slice", "head_slices", "load_backend", "new_secret", "register_backend"]

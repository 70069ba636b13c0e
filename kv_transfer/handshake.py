"""The compatibility check a receiver runs on every sender that connects.

The sender's first message carries its KVLayout and backend name; the receiver compares them
with its own and answers with its layout (Welcome) or the list of mismatches (Refuse). Both
sides may differ in TP size, rank, pipeline stages, block count and device: resharding and
block maps absorb those. Everything else must match, or the bytes would mean different things on each side.
"""

from __future__ import annotations

from proto.kv import KVLayout

# Fields that must be equal on both sides, in the order mismatches are reported.
MUST_MATCH = ("version", "model_id", "dtype", "block_size", "total_num_layers", "total_num_kv_heads", "head_dim")

# Version of the control messages in kv_transfer/messages.py; bumped when they change
# (2: both sides authenticate with the deployment's secret; torch_dist meets over the channel).
PROTOCOL_VERSION = 2


class HandshakeError(RuntimeError):
    """A sender and receiver cannot exchange KV; the message names every mismatch."""


def check_compatible(
    sender: KVLayout,
    receiver: KVLayout,
    sender_backend: str,
    receiver_backend: str,
    sender_protocol: int = PROTOCOL_VERSION,
) -> None:
    """Raise HandshakeError naming every field on which the two sides disagree."""
    found = []
    if sender_protocol != PROTOCOL_VERSION:
        found.append(f"protocol: sender speaks {sender_protocol}, receiver {PROTOCOL_VERSION}")
    if sender_backend != receiver_backend:
        found.append(f"backend: sender uses {sender_backend!r}, receiver {receiver_backend!r}")
    for name in MUST_MATCH:
        ours, theirs = getattr(sender, name), getattr(receiver, name)
        if ours != theirs:
            found.append(f"{name}: sender has {ours!r}, receiver has {theirs!r}")
    if found:
        raise HandshakeError("KV transfer handshake failed: " + "; ".join(found))

"""Who may move KV: a peer proves it holds the deployment's secret before it gets anything.

Every deployment has one secret, made by `tandem serve` (or taken from $TANDEM_KV_SECRET,
which the Helm chart fills from a Kubernetes Secret) and handed to every worker. A connection
is authenticated both ways by HMAC-SHA256 challenge-response over fresh nonces, before the
receiver reads more than a small, bounded handshake message or allocates anything::

    receiver                                       sender
      Challenge(nonce_r)                  ──▶
                                          ◀──      Hello(..., nonce_s, HMAC(secret, "hello", nonce_r, nonce_s))
      check; Welcome(..., HMAC(secret, "welcome", nonce_s, nonce_r))  ──▶   check

The secret itself never crosses the wire, and a recorded exchange cannot be replayed (the
other side's nonce is new each time). The same secret guards each backend's own side door:
the shared-memory backend hands out its cache's file descriptor only after the same proof.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from kv_transfer.handshake import HandshakeError

SECRET_ENV = "TANDEM_KV_SECRET"  # hex, or any text of 32+ characters; the chart sets it from a Kubernetes Secret
SECRET_BYTES = 32
NONCE_BYTES = 16


class AuthenticationError(HandshakeError):
    """A peer could not prove it holds the deployment's KV secret."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def deployment_secret() -> bytes:
    """$TANDEM_KV_SECRET when set, else a new random secret. The variable holds hex (e.g.
    `openssl rand -hex 32`) or any text of at least 32 characters (e.g. Helm's randAlphaNum)."""
    text = os.environ.get(SECRET_ENV, "").strip()
    if not text:
        return new_secret()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = text.encode()
        if len(text) < 32:
            raise ValueError(f"${SECRET_ENV} must be hex or at least 32 characters, got {len(text)}") from None
    if len(secret) < 16:
        raise ValueError(f"${SECRET_ENV} holds {len(secret)} bytes; use at least 16 (32 recommended)")
    return secret


def check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("the KV secret must be at least 16 bytes (kv_transfer.auth.new_secret() makes one)")
    return secret


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, label: str, *nonces: bytes) -> bytes:
    """HMAC-SHA256 over a label (so that one side's proof is never valid as the other's) and nonces."""
    mac = hmac.new(secret, label.encode() + b"\0", hashlib.sha256)
    for nonce in nonces:
        mac.update(len(nonce).to_bytes(2, "big") + nonce)
    return mac.digest()


def verify(secret: bytes, claimed: bytes, label: str, *nonces: bytes) -> bool:
    """Whether `claimed` is the proof for these nonces; constant time."""
    return isinstance(claimed, bytes) and hmac.compare_digest(claimed, proof(secret, label, *nonces))

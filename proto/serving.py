"""What a request's stream looks like as it crosses from workers to the router."""

from __future__ import annotations

from dataclasses import dataclass

from proto.kv import KVLayout


@dataclass(frozen=True)
class TokenDelta:
    """Tokens and text a request produced since its previous delta."""

    request_id: str
    token_ids: tuple[int, ...]  # new tokens, in order
    text: str  # new final text (detokenized by the worker; stop strings already cut)
    finished: bool  # the last delta of this request
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished
    num_prompt_tokens: int  # prompt length in tokens
    num_cached_tokens: int  # prompt tokens that came from the prefix cache
    error: str | None = None  # why the request failed (finish_reason "error"), else None
    # For an "error": True when the cause is the server's state (a worker died or broke, the
    # server is shutting down), so the same request may succeed if retried (gRPC UNAVAILABLE,
    # HTTP 503); False when the request failed on its own (INTERNAL, 500).
    retryable: bool = False


@dataclass(frozen=True)
class KVHandle:
    """Where a prefill worker must push a request's KV: blocks a decode worker reserved."""

    request_id: str
    endpoints: tuple[str, ...]  # the KV receivers of every rank of the decode worker
    block_ids: tuple[int, ...]  # reserved destination blocks, in prompt order


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill worker returns once the prompt is computed."""

    request_id: str
    first_token_id: int  # sampled from the prompt's last position


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker's engine settled on (defaults resolved), for the router."""

    max_model_len: int  # prompt plus output tokens at most
    layout: KVLayout  # this rank's KV cache: block size, dtype, heads, TP rank and size
    cores: tuple[int, ...] = ()  # the CPU cores any thread of rank 0's process may run on
    num_threads: int = 0  # torch's compute threads in rank 0's process

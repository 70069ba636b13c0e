"""What a request's stream looks like as it crosses from workers to the router."""

from __future__ import annotations

from dataclasses import dataclass


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

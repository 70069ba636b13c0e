"""How the router reaches its workers: one typed client per worker, whatever carries the calls.

The orchestrator sees only these Protocols. deploy/ray_clients.py implements them over Ray
actors (the only place a `.remote` call is made); the worker actors themselves
(prefill_worker/actor.py, decode_worker/actor.py) implement them in process, which is how
tests drive the router without Ray.

Errors a call raises, whatever the transport:
  ValueError      the request is bad (the worker's engine refused it)
  Overloaded      the worker's queue is full
  Unavailable     the worker cannot serve now (its engine broke, a rank is gone)
  WorkerLost      the worker died or stopped answering (an Unavailable)
  RuntimeError    anything else the worker raised, with its message (TransferFailed, ...)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from proto.serving import Detached, GenerateRequest, KVHandle, PrefillResult, StepRecord, TokenDelta, WorkerStats


class PrefillClient(Protocol):
    """A prefill worker (rank 0 of its tensor-parallel ranks)."""

    async def prefill(self, request: GenerateRequest, handle: KVHandle) -> PrefillResult:
        """Compute the prompt and push its KV to `handle`; returns the first token once the
        prompt is computed (the transfer may still be finishing)."""

    async def abort(self, request_id: str) -> None:
        """Stop the request wherever it is; its blocks come back once no transfer reads them.
        Unknown ids are remembered, so a prefill that arrives later is refused."""

    async def stats(self) -> WorkerStats:
        """Its gauges; raises Unavailable once its engine broke."""

    async def take_steps(self) -> list[StepRecord]:
        """The steps its engine ran since the last call, oldest first (at most the newest
        20,000): what each computed and how long it took as served."""


class DecodeClient(Protocol):
    """A decode worker (rank 0 of its tensor-parallel ranks)."""

    async def reserve(self, request: GenerateRequest) -> KVHandle:
        """Wait in line for a batch slot and blocks for the prompt, register them with every
        rank's KV receiver, and say where the prefill worker must push."""

    def admit(self, request_id: str, first_token_id: int) -> AsyncGenerator[TokenDelta, None]:
        """Once the KV arrived on every rank, stream the reserved request from its first token;
        closing the stream early aborts it."""

    def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        """Prefill here and decode (short prompts, or no prefill worker); closing the stream
        early aborts it."""

    async def abort(self, request_id: str) -> None:
        """As PrefillClient.abort (a detached request's blocks too)."""

    async def detach(self, request_id: str) -> Detached:
        """Live migration, source side: take a decoding request out of the batch, its blocks
        kept; its stream ends (an "abort" delta) after the last token it got. ValueError when
        it is not decoding there (it goes on untouched)."""

    async def migrate_out(self, request_id: str, handle: KVHandle) -> None:
        """Copy a detached request's KV to the decode worker that reserved `handle` for it;
        returns once the copy is confirmed there, and frees it here. On failure
        (RuntimeError) the request stays detached: reattach() or abort()."""

    def reattach(self, request_id: str) -> AsyncGenerator[TokenDelta, None]:
        """A detached request goes on where it stopped, streaming from its next token."""

    async def stats(self) -> WorkerStats:
        """Its gauges; raises Unavailable once its engine broke."""

    async def take_steps(self) -> list[StepRecord]:
        """The steps its engine ran since the last call, oldest first (at most the newest
        20,000): what each computed and how long it took as served."""

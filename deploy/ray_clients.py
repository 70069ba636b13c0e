"""router.clients over Ray: the only place the router's calls become `.remote` calls.

Each client wraps rank 0's actor of one worker. Ray's errors are translated here, so that the
router meets the same exceptions as with in-process workers: a dead or unreachable actor is
WorkerLost; a worker's ValueError, Overloaded or Unavailable arrives as itself; anything else
it raised as a RuntimeError naming the cause.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from proto.errors import Overloaded, Unavailable, WorkerLost
from proto.serving import GenerateRequest, KVHandle, PrefillResult, TokenDelta, WorkerStats

_PASSED_THROUGH = (ValueError, Overloaded, Unavailable)


def _translate(exc: Exception, what: str) -> Exception:
    if isinstance(exc, RayActorError):
        return WorkerLost(f"{what} died: {type(exc).__name__}")
    if isinstance(exc, GetTimeoutError):
        return WorkerLost(f"{what} did not answer: {exc}")
    cause = getattr(exc, "cause", None)
    if isinstance(cause, _PASSED_THROUGH):
        return cause
    return RuntimeError(f"{type(cause or exc).__name__}: {cause or exc}")


async def _call(ref, what: str):
    try:
        return await ref
    except (RayActorError, GetTimeoutError, RayTaskError) as exc:
        raise _translate(exc, what) from None


async def _stream(generator, what: str) -> AsyncGenerator[TokenDelta, None]:
    try:
        async for ref in generator:
            yield await ref
    except (RayActorError, GetTimeoutError, RayTaskError) as exc:
        raise _translate(exc, what) from None


class RayPrefillClient:
    """router.clients.PrefillClient over a PrefillActor."""

    def __init__(self, actor, name: str):
        self.actor = actor
        self.name = name  # e.g. "prefill worker 0", in errors

    async def prefill(self, request: GenerateRequest, handle: KVHandle) -> PrefillResult:
        return await _call(self.actor.prefill.remote(request, handle), self.name)

    async def abort(self, request_id: str) -> None:
        self.actor.abort.remote(request_id)  # fire and forget: a dead worker holds nothing

    async def stats(self) -> WorkerStats:
        return await _call(self.actor.stats.remote(), self.name)


class RayDecodeClient:
    """router.clients.DecodeClient over a DecodeActor."""

    def __init__(self, actor, name: str):
        self.actor = actor
        self.name = name

    async def reserve(self, request: GenerateRequest) -> KVHandle:
        return await _call(self.actor.reserve.remote(request), self.name)

    def admit(self, request_id: str, first_token_id: int) -> AsyncGenerator[TokenDelta, None]:
        return _stream(self.actor.admit.remote(request_id, first_token_id), self.name)

    def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        return _stream(self.actor.generate.remote(request), self.name)

    async def abort(self, request_id: str) -> None:
        self.actor.abort.remote(request_id)

    async def stats(self) -> WorkerStats:
        return await _call(self.actor.stats.remote(), self.name)

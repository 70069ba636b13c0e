"""router.clients over Ray: the only place the router's calls become `.remote` calls.

Each client wraps rank 0's actor of one worker. Ray's errors are translated here, so that the
router meets the same exceptions as with in-process workers: a dead or unreachable actor is
WorkerLost; a worker's ValueError, Overloaded or Unavailable arrives as itself; anything else
it raised as a RuntimeError naming the cause.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from proto.errors import Overloaded, Unavailable, WorkerLost
from proto.serving import Detached, GenerateRequest, KVHandle, PrefillResult, Role, StepRecord, TokenDelta, WorkerStats

_PASSED_THROUGH = (ValueError, Overloaded, Unavailable)


def _translate(exc: Exception, what: str) -> Exception:
    if isinstance(exc, RayActorError | ObjectLostError):  # dead, restarting, or its results lost with it
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
    except (RayActorError, ObjectLostError, GetTimeoutError, RayTaskError) as exc:
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

    async def take_steps(self) -> list[StepRecord]:
        return await _call(self.actor.take_steps.remote(), self.name)


class RayDecodeClient:
    """router.clients.DecodeClient over a DecodeActor.

    Deltas come over the worker's one channel (DecodeActor.deltas: a list per engine step for
    all of this router's requests there), which one task per worker reads and hands out to
    each request's stream; a request is started with one call. A lost worker ends every
    stream waiting on it with WorkerLost; the next request opens the channel again (to the
    restarted worker). A request starts only once the worker has taken the channel's
    listener: before that, a previous listener (this router's on an event loop gone, a
    reader that failed) could still take its first deltas."""

    def __init__(self, actor, name: str):
        self.actor = actor
        self.name = name
        self._streams: dict[str, asyncio.Queue[TokenDelta | Exception]] = {}
        self._reader: asyncio.Task | None = None
        self._listening = asyncio.Event()  # the current reader's listener is the worker's

    async def reserve(self, request: GenerateRequest) -> KVHandle:
        return await _call(self.actor.reserve.remote(request), self.name)

    def admit(self, request_id: str, first_token_id: int) -> AsyncGenerator[TokenDelta, None]:
        return self._stream(request_id, lambda: self.actor.start_admit.remote(request_id, first_token_id))

    def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        return self._stream(request.request_id, lambda: self.actor.start_generate.remote(request))

    async def detach(self, request_id: str) -> Detached:
        return await _call(self.actor.detach.remote(request_id), self.name)

    async def migrate_out(self, request_id: str, handle: KVHandle) -> None:
        await _call(self.actor.migrate_out.remote(request_id, handle), self.name)

    def reattach(self, request_id: str) -> AsyncGenerator[TokenDelta, None]:
        return self._stream(request_id, lambda: self.actor.start_reattach.remote(request_id))

    async def _stream(self, request_id: str, start) -> AsyncGenerator[TokenDelta, None]:
        queue: asyncio.Queue[TokenDelta | Exception] = asyncio.Queue()
        self._streams[request_id] = queue  # before the start: its first delta may come at once
        try:
            if self._reader is None or self._reader.done():
                self._listening = asyncio.Event()
                self._reader = asyncio.create_task(self._read(self._listening))
            if not self._listening.is_set():
                await self._until_listening(queue)
            await _call(start(), self.name)
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self._streams.get(request_id) is queue:
                del self._streams[request_id]

    async def _until_listening(self, queue: asyncio.Queue[TokenDelta | Exception]) -> None:
        """Wait until the worker took the current reader's listener; if the reader ends first,
        raise what it put in the stream's queue (the worker's loss)."""
        assert self._reader is not None
        reader, listening = self._reader, asyncio.ensure_future(self._listening.wait())
        await asyncio.wait([listening, reader], return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if not self._listening.is_set():
            reader.result()  # re-raises what ended it, if not the worker's loss
            item = None if queue.empty() else queue.get_nowait()
            raise item if isinstance(item, Exception) else Unavailable(f"{self.name}: its delta channel closed")

    async def _read(self, listening: asyncio.Event) -> None:
        """Hand each delta of the worker's channel to its request's stream, until the worker is
        lost. The channel's first item, empty, says the worker has taken this listener."""
        try:
            async for ref in self.actor.deltas.remote():
                batch = await ref
                listening.set()
                for delta in batch:
                    queue = self._streams.get(delta.request_id)
                    if queue is not None:  # else: a request this router gave up on
                        queue.put_nowait(delta)
        except (RayActorError, ObjectLostError, GetTimeoutError, RayTaskError) as exc:
            lost = _translate(exc, self.name)
            for queue in list(self._streams.values()):
                queue.put_nowait(lost)

    async def abort(self, request_id: str) -> None:
        self.actor.abort.remote(request_id)

    async def stats(self) -> WorkerStats:
        return await _call(self.actor.stats.remote(), self.name)

    async def take_steps(self) -> list[StepRecord]:
        return await _call(self.actor.take_steps.remote(), self.name)


class RayRoleClient(RayDecodeClient):
    """Both clients over a RoleActor (elastic/role_actor.py), a worker that changes role: the
    router holds it in both roles' lists, one of them retired (router/rebalance.py). Ray
    restarts a dead worker with the role it was started with: the next stats call puts it
    back in the role it had."""

    def __init__(self, actor, name: str, role: Role):
        super().__init__(actor, name)
        self.role = role
        self._incarnation: str | None = None  # the worker process the role was set on

    async def stats(self) -> WorkerStats:
        incarnation, role, stats = await _call(self.actor.role_stats.remote(), self.name)
        if self._incarnation is None:
            self._incarnation = incarnation
        elif incarnation != self._incarnation:  # Ray restarted it, in the role it was started with
            if role is not self.role:
                await self.set_role(self.role)  # it holds nothing yet
                incarnation, role, stats = await _call(self.actor.role_stats.remote(), self.name)
            self._incarnation = incarnation
        return stats

    async def prefill(self, request: GenerateRequest, handle: KVHandle) -> PrefillResult:
        return await _call(self.actor.prefill.remote(request, handle), self.name)

    async def set_role(self, role: Role) -> float:
        """Switch the worker's role (it must hold no request); the seconds it took."""
        switched = await _call(self.actor.set_role.remote(role), self.name)
        self.role = Role(role)
        return switched

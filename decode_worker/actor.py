"""The decode worker as a Ray actor: a thin async shell around DecodeWorker.

In process, DecodeActor is itself a router.clients.DecodeClient: admit() and generate() are
per-request async generators. Over Ray, a stream per request would make every token its own
Ray object, so the Ray client (deploy/ray_clients.py) uses the worker's one delta channel
instead: start_admit() / start_generate() start a request, and deltas() streams the deltas of
every request so started, each turn's as one list (one Ray object per engine step, not per
token and request).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence

from decode_worker.follower import DecodeFollower
from decode_worker.worker import DecodeWorker, TransferFailed
from engine import EngineConfig
from engine.cores import bind_cores, process_cores
from engine.engine_loop import delta_stream
from proto.serving import Detached, GenerateRequest, KVHandle, StepRecord, TokenDelta, WorkerInfo, WorkerStats


class DecodeActor:
    """Created with ray.remote(...) by deploy/; every method runs on the actor's event loop."""

    def __init__(
        self,
        model_dir: str,
        engine_config: EngineConfig,
        kv_backend: str,
        host: str | None = None,
        transfer_timeout_s: float = 30.0,
        max_waiting: int = 256,
        dist_init: str | None = None,
        *,
        kv_secret: bytes,
        cores: Sequence[int] | None = None,
    ):
        """With tensor parallelism: dist_init, where this rank and the DecodeFollowerActors of
        ranks 1..tp-1 meet (their constructors run together). cores: the CPU cores this rank
        owns (engine/cores.py), bound before the model loads."""
        if cores:
            bind_cores(cores)
        self.worker = DecodeWorker(
            model_dir,
            engine_config,
            kv_backend,
            host or node_ip(),
            transfer_timeout_s,
            max_waiting,
            dist_init,
            kv_secret=kv_secret,
        )
        self._open_channel()

    @classmethod
    def over(cls, worker: DecodeWorker) -> DecodeActor:
        """The shell around a worker built elsewhere (a role change, elastic/role_actor.py)."""
        actor = cls.__new__(cls)
        actor.worker = worker
        actor._open_channel()
        return actor

    def _open_channel(self) -> None:
        # The delta channel: deltas waiting for the listener, and which listener is current.
        self._pending: deque[TokenDelta] = deque()
        self._ready: asyncio.Event | None = None  # created on the actor's event loop
        self._listener = 0

    async def reserve(self, request: GenerateRequest) -> KVHandle:
        """Wait (queued, without a thread) for room, then register the blocks on every rank."""
        # Both halves wait for the engine lock or for followers: keep the actor's event loop free.
        granted = await asyncio.to_thread(self.worker.request_blocks, request)
        block_ids = await asyncio.wrap_future(granted)
        return await asyncio.to_thread(self.worker.register, request.request_id, block_ids)

    async def admit(self, request_id: str, first_token_id: int) -> AsyncGenerator[TokenDelta, None]:
        """Wait for the request's KV on every rank, then stream its deltas from the first token on."""
        await self.worker.wait_kv_async(request_id)
        async for delta in self._stream(request_id, lambda cb: self.worker.admit(request_id, first_token_id, cb)):
            yield delta

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        """Prefill here and decode (short prompts: conditional disaggregation)."""
        async for delta in self._stream(request.request_id, lambda cb: self.worker.generate(request, cb)):
            yield delta

    def _stream(self, request_id: str, start: Callable[[Callable[[TokenDelta], None]], None]):
        async def start_async(on_delta):
            await asyncio.to_thread(start, on_delta)  # submit waits for the engine lock

        async def stop():
            self.worker.abort(request_id)

        return delta_stream(start_async, stop)

    async def abort(self, request_id: str) -> None:
        await asyncio.to_thread(self.worker.abort, request_id)  # waits for the engine lock

    # ---- live migration out (DecodeWorker.detach, migrate_out, reattach) ----------------

    async def detach(self, request_id: str) -> Detached:
        """Take a decoding request out of the batch (its stream ends), its blocks kept."""
        future = await asyncio.to_thread(self.worker.detach, request_id)
        return await asyncio.wrap_future(future)

    async def migrate_out(self, request_id: str, handle: KVHandle) -> None:
        """Copy a detached request's KV to the worker that reserved `handle`; returns once the
        copy is confirmed there (TransferFailed otherwise: the request stays detached here)."""
        done = await asyncio.to_thread(self.worker.migrate_out, request_id, handle)
        try:
            await asyncio.wrap_future(done)
        except TransferFailed as exc:
            raise TransferFailed(f"copying the KV of {request_id} failed: {exc}") from None

    async def reattach(self, request_id: str) -> AsyncGenerator[TokenDelta, None]:
        """A detached request goes on here; streams its deltas from the next token on."""
        async for delta in self._stream(request_id, lambda cb: self.worker.reattach(request_id, cb)):
            yield delta

    async def start_reattach(self, request_id: str) -> None:
        """reattach(), its deltas sent on deltas()."""
        await asyncio.to_thread(self.worker.reattach, request_id, self._channel()[1])

    # ---- the delta channel (the Ray client's way) ----------------------------------------

    def _channel(self) -> tuple[asyncio.Event, Callable[[TokenDelta], None]]:
        """The channel's wake-up event and its on_delta (safe from the engine thread)."""
        if self._ready is None:
            self._ready = asyncio.Event()
        ready, loop = self._ready, asyncio.get_running_loop()

        def push(delta: TokenDelta) -> None:
            self._pending.append(delta)
            ready.set()

        def on_delta(delta: TokenDelta) -> None:  # the engine thread
            loop.call_soon_threadsafe(push, delta)

        return ready, on_delta

    async def start_admit(self, request_id: str, first_token_id: int) -> None:
        """admit(), its deltas sent on deltas() (returns once the request runs)."""
        _, on_delta = self._channel()
        await self.worker.wait_kv_async(request_id)
        await asyncio.to_thread(self.worker.admit, request_id, first_token_id, on_delta)

    async def start_generate(self, request: GenerateRequest) -> None:
        """generate(), its deltas sent on deltas() (returns once the request is queued)."""
        await asyncio.to_thread(self.worker.generate, request, self._channel()[1])

    async def deltas(self) -> AsyncGenerator[list[TokenDelta], None]:
        """The deltas of every request started with start_admit() or start_generate(), all
        that arrived since the last item as one list, for as long as the caller listens; the
        first item is empty, once this listener is the channel's. One listener at a time: a new
        call ends the previous one (a router whose event loop went away), which takes nothing
        more."""
        ready, _ = self._channel()
        self._listener += 1
        me = self._listener
        ready.set()  # wake the previous listener, which sees it is replaced
        yield []  # this listener is the channel's: the caller may start requests
        while True:
            await ready.wait()
            if self._listener != me:
                return
            ready.clear()
            if self._pending:
                batch = list(self._pending)
                self._pending.clear()
                yield batch

    def close_channel(self) -> None:
        """End the current deltas() listener (the shell is going away: a role change)."""
        self._listener += 1
        if self._ready is not None:
            self._ready.set()

    async def stats(self) -> WorkerStats:
        return self.worker.stats()

    async def take_steps(self) -> list[StepRecord]:
        return self.worker.take_steps()

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker.engine.max_model_len, self.worker.engine.kv_cache.layout, *process_cores())

    def shutdown(self) -> None:
        self.worker.close()


def node_ip() -> str:
    """Where prefill workers on other nodes can reach this actor's KV receiver."""
    import ray

    return ray.util.get_node_ip_address()


class DecodeFollowerActor:
    """Rank r > 0 of a tensor-parallel decode worker: runs rank 0's steps, receives its KV heads
    (rank 0 talks to it over their process group)."""

    def __init__(
        self,
        model_dir: str,
        engine_config: EngineConfig,
        kv_backend: str,
        host: str | None,
        rank: int,
        dist_init: str,
        *,
        kv_secret: bytes,
        cores: Sequence[int] | None = None,
    ):
        if cores:
            bind_cores(cores)
        self.follower = DecodeFollower(
            model_dir, engine_config, kv_backend, host or node_ip(), rank, dist_init, kv_secret=kv_secret
        )

    def endpoint(self) -> str:
        return self.follower.endpoint

    def num_transfers(self) -> int:
        """This rank's parts not settled yet."""
        return self.follower.num_transfers()

    def shutdown(self) -> None:
        """Call after rank 0's shutdown, which stops this rank's loop."""
        self.follower.close()

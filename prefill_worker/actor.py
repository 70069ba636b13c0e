"""The prefill worker as a Ray actor: a thin async shell around PrefillWorker."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from engine import EngineConfig
from engine.cores import bind_cores, process_cores
from prefill_worker.worker import PrefillFollower, PrefillWorker
from proto.serving import GenerateRequest, KVHandle, PrefillResult, StepRecord, WorkerInfo, WorkerStats


class PrefillActor:
    """Created with ray.remote(...) by deploy/; every method runs on the actor's event loop.
    In process, it is itself a router.clients.PrefillClient (tests use it so)."""

    def __init__(
        self,
        model_dir: str,
        engine_config: EngineConfig,
        kv_backend: str,
        transfer_timeout_s: float = 30.0,
        dist_init: str | None = None,
        *,
        kv_secret: bytes,
        cores: Sequence[int] | None = None,
    ):
        """cores: the CPU cores this rank owns (engine/cores.py), bound before the model loads."""
        if cores:
            bind_cores(cores)
        self.worker = PrefillWorker(
            model_dir, engine_config, kv_backend, transfer_timeout_s, dist_init, kv_secret=kv_secret
        )

    @classmethod
    def over(cls, worker: PrefillWorker) -> PrefillActor:
        """The shell around a worker built elsewhere (a role change, elastic/role_actor.py)."""
        actor = cls.__new__(cls)
        actor.worker = worker
        return actor

    async def prefill(self, request: GenerateRequest, handle: KVHandle) -> PrefillResult:
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()

        def on_done(r) -> None:  # engine thread
            def settle():
                if not result.done():
                    result.set_exception(r) if isinstance(r, Exception) else result.set_result(r)

            loop.call_soon_threadsafe(settle)

        # submit waits for the engine lock (up to one step): keep the actor's event loop free.
        await asyncio.to_thread(self.worker.prefill, request, handle, on_done)
        try:
            return await result
        except asyncio.CancelledError:
            await asyncio.to_thread(self.worker.abort, request.request_id)
            raise

    async def abort(self, request_id: str) -> None:
        await asyncio.to_thread(self.worker.abort, request_id)  # waits for the engine lock

    async def stats(self) -> WorkerStats:
        return self.worker.stats()

    async def take_steps(self) -> list[StepRecord]:
        return self.worker.take_steps()

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker.engine.max_model_len, self.worker.layout, *process_cores())

    def shutdown(self) -> None:
        self.worker.close()


class PrefillFollowerActor:
    """Rank r > 0 of a tensor-parallel prefill worker (it reports to rank 0 over their process group)."""

    def __init__(
        self,
        model_dir: str,
        engine_config: EngineConfig,
        kv_backend: str,
        transfer_timeout_s: float,
        rank: int,
        dist_init: str,
        *,
        kv_secret: bytes,
        cores: Sequence[int] | None = None,
    ):
        if cores:
            bind_cores(cores)
        self.follower = PrefillFollower(
            model_dir,
            engine_config,
            kv_backend,
            transfer_timeout_s,
            rank,
            dist_init,
            kv_secret=kv_secret,
        )

    def shutdown(self) -> None:
        """Call after rank 0's shutdown, which stops this rank's loop."""
        self.follower.close()

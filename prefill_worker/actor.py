"""The prefill worker as a Ray actor: a thin async shell around PrefillWorker."""

from __future__ import annotations

import asyncio

from engine import EngineConfig, SamplingParams
from prefill_worker.worker import PrefillWorker
from proto.serving import KVHandle, PrefillResult


class PrefillActor:
    """Created with ray.remote(...) by deploy/; every method runs on the actor's event loop."""

    def __init__(self, model_dir: str, engine_config: EngineConfig, kv_backend: str,
                 transfer_timeout_s: float = 30.0):
        self.worker = PrefillWorker(model_dir, engine_config, kv_backend, transfer_timeout_s)

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      handle: KVHandle) -> PrefillResult:
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()

        def on_done(r) -> None:  # engine thread
            def settle():
                if not result.done():
                    result.set_exception(r) if isinstance(r, Exception) else result.set_result(r)
            loop.call_soon_threadsafe(settle)

        self.worker.prefill(request_id, prompt_token_ids, params, handle, on_done)
        try:
            return await result
        except asyncio.CancelledError:
            self.worker.abort(request_id)
            raise

    def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)

    def stats(self) -> dict[str, float]:
        return self.worker.stats()

    def block_size(self) -> int:
        return self.worker.layout.block_size

    def shutdown(self) -> None:
        self.worker.close()

"""The decode worker as a Ray actor: a thin async shell around DecodeWorker.

Streams are async generators: the caller iterates the ObjectRefGenerator Ray returns.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from decode_worker.worker import DecodeWorker
from engine import EngineConfig, SamplingParams
from engine.engine_loop import delta_stream
from proto.serving import KVHandle, TokenDelta, WorkerInfo


class DecodeActor:
    """Created with ray.remote(...) by deploy/; every method runs on the actor's event loop."""

    def __init__(self, model_dir: str, engine_config: EngineConfig, kv_backend: str, host: str | None = None,
                 transfer_timeout_s: float = 30.0, max_waiting: int = 256):
        if host is None:  # listen where prefill workers on other nodes can reach us
            import ray
            host = ray.util.get_node_ip_address()
        self.worker = DecodeWorker(model_dir, engine_config, kv_backend, host, transfer_timeout_s, max_waiting)

    async def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVHandle:
        # reserve waits for the engine lock (up to one step): keep the actor's event loop free.
        return await asyncio.to_thread(self.worker.reserve, request_id, prompt_token_ids, params)

    async def admit(self, request_id: str, first_token_id: int) -> AsyncIterator[TokenDelta]:
        """Wait for the request's KV, then stream its deltas from the first token on."""
        await self.worker.transfer_of(request_id).wait_async()
        async for delta in self._stream(request_id, lambda cb: self.worker.admit(request_id, first_token_id, cb)):
            yield delta

    async def generate_local(self, request_id: str, prompt_token_ids: list[int],
                             params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """Prefill here and decode (short prompts: conditional disaggregation)."""
        async for delta in self._stream(
                request_id, lambda cb: self.worker.generate_local(request_id, prompt_token_ids, params, cb)):
            yield delta

    def _stream(self, request_id: str, start: Callable[[Callable[[TokenDelta], None]], None]):
        async def start_async(on_delta):
            start(on_delta)

        async def stop():
            self.worker.abort(request_id)
        return delta_stream(start_async, stop)

    async def abort(self, request_id: str) -> None:
        await asyncio.to_thread(self.worker.abort, request_id)  # waits for the engine lock

    def stats(self) -> dict[str, float]:
        return self.worker.stats()

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker.engine.max_model_len, self.worker.engine.kv_cache.layout)

    def shutdown(self) -> None:
        self.worker.close()

"""One engine in this process doing both phases: colocated serving behind the Backend interface
(`tandem serve --colocated`, and the backend the frontends' tests run on)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING

from engine import EngineConfig, LLMEngine
from engine.engine_loop import EngineLoop, delta_stream
from proto.serving import GenerateRequest, Role, TokenDelta
from router.backend import Migration, WorkerStatus, WorkerSteps

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class LocalBackend:
    """One engine in this process, on its own thread, doing prefill and decode."""

    def __init__(
        self,
        model_dir: str | Path,
        engine_config: EngineConfig = EngineConfig(),
        model_name: str | None = None,
        max_waiting: int = 256,
    ):
        engine = LLMEngine(model_dir, engine_config)
        self.model_name = model_name or Path(model_dir).name
        self.max_model_len = engine.max_model_len
        self._loop = EngineLoop(engine, max_waiting=max_waiting)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self._loop.engine.tokenizer

    def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        prompt = list(request.prompt_token_ids)
        # submit waits for the engine lock (up to one step): keep the event loop free.
        return delta_stream(
            lambda on_delta: asyncio.to_thread(self._loop.submit, request.request_id, prompt, request.params, on_delta),
            lambda: self.abort(request.request_id),
        )

    async def abort(self, request_id: str) -> None:
        await asyncio.to_thread(self._loop.abort, request_id)

    def is_ready(self) -> bool:
        return self._loop.healthy

    def stats(self) -> dict[str, float]:
        return self._loop.stats().gauges()

    def workers(self) -> list[WorkerStatus]:
        up = self._loop.healthy
        return [WorkerStatus(Role.COLOCATED, 0, up, self._loop.stats() if up else None)]

    async def refresh(self) -> None:
        """stats() is read live from the engine: nothing to fetch."""

    async def drain(self, role: str, index: int, timeout_s: float) -> int:
        raise ValueError("a colocated server has one engine and no workers to drain")

    def undrain(self, role: str, index: int) -> None:
        raise ValueError("a colocated server has one engine and no workers to drain")

    async def migrate(self, request_id: str, to: int | None = None) -> Migration:
        raise ValueError("a colocated server has one engine and no decode worker to migrate to")

    async def take_steps(self) -> list[WorkerSteps]:
        return [WorkerSteps(Role.COLOCATED, 0, self._loop.take_steps())]

    def close(self) -> None:
        self._loop.close()

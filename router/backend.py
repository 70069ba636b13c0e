"""What the frontends (gRPC, HTTP) talk to: something that turns prompts into TokenDeltas.

`Backend` is the interface. `LocalBackend` runs one engine in this process doing both
phases (colocated serving: the baseline that disaggregation is measured against, and the
backend of `tandem serve --colocated`); the disaggregated orchestrator implements the same
interface over prefill and decode workers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Mapping, Protocol

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.engine_loop import EngineLoop, Overloaded, Unavailable, delta_stream
from proto.serving import TokenDelta

__all__ = ["STATS_INTERVAL_S", "Backend", "LocalBackend", "Overloaded", "Unavailable", "WorkerStatus"]

# While served, a backend's health and worker stats are at most this old (router/server.py
# refreshes them on this interval).
STATS_INTERVAL_S = 0.2


class Backend(Protocol):
    model_name: str  # the name clients use (KServe model name, OpenAI model id)
    max_model_len: int  # prompt plus output tokens at most

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer (chat templates, token counts)."""

    def generate(self, request_id: str, prompt: str | list[int],
                 params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """Stream a request's deltas; the last one has finished=True.

        Raises ValueError for bad input and Overloaded when admission control refuses,
        both before the first delta. Closing the iterator early (client gone) aborts the
        request and frees its KV blocks on every worker.
        """

    async def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; unknown ids are ignored."""

    def is_ready(self) -> bool:
        """Whether every worker is up and requests can be served."""

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics: queue lengths, KV block usage, transfer counters (sums over
        the workers that are up)."""

    def workers(self) -> list[WorkerStatus]:
        """Each worker: up or not, and its own gauges (none when it is down)."""

    async def refresh(self) -> None:
        """Bring stats() up to date (a /metrics scrape calls it)."""


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the router last saw it, for per-worker gauges."""

    role: str  # "prefill" | "decode" | "colocated"
    index: int  # within its role
    up: bool  # answered its last stats call and its engine runs
    stats: Mapping[str, float]  # its gauges (num_waiting, num_reserved, ...); empty when down


class LocalBackend:
    """One engine in this process, on its own thread, doing prefill and decode."""

    def __init__(self, model_dir: str | Path, engine_config: EngineConfig = EngineConfig(),
                 model_name: str | None = None, max_waiting: int = 256):
        engine = LLMEngine(model_dir, engine_config)
        self.model_name = model_name or Path(model_dir).name
        self.max_model_len = engine.max_model_len
        self._loop = EngineLoop(engine, max_waiting=max_waiting)

    @property
    def tokenizer(self):
        return self._loop.engine.tokenizer

    def generate(self, request_id: str, prompt: str | list[int],
                 params: SamplingParams) -> AsyncIterator[TokenDelta]:
        # submit waits for the engine lock (up to one step): keep the event loop free.
        return delta_stream(
            lambda on_delta: asyncio.to_thread(self._loop.submit, request_id, prompt, params, on_delta),
            lambda: self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        await asyncio.to_thread(self._loop.abort, request_id)

    def is_ready(self) -> bool:
        return self._loop.healthy

    def stats(self) -> dict[str, float]:
        return self._loop.stats()

    def workers(self) -> list[WorkerStatus]:
        up = self._loop.healthy
        return [WorkerStatus("colocated", 0, up, self._loop.stats() if up else {})]

    async def refresh(self) -> None:
        """stats() is read live from the engine: nothing to fetch."""

    def close(self) -> None:
        self._loop.close()

"""What the frontends (gRPC, HTTP) talk to: something that turns requests into TokenDeltas.

`Backend` is the interface. router/local_backend.py's `LocalBackend` runs one engine in this
process doing both phases (colocated serving: `tandem serve --colocated`);
router/orchestrator.py's `DisaggregatedBackend` implements the same interface over prefill and
decode workers.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proto.errors import Overloaded, Unavailable
from proto.serving import GenerateRequest, Role, StepRecord, TokenDelta, WorkerStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DRAIN_TIMEOUT_S", "STATS_INTERVAL_S", "Backend", "Overloaded", "Unavailable", "WorkerStatus"]

# While served, a backend's health and worker stats are at most this old (router/server.py
# refreshes them on this interval).
STATS_INTERVAL_S = 0.2
DRAIN_TIMEOUT_S = 120.0  # how long a drain waits, by default, for the requests on a worker to leave it


class Backend(Protocol):
    model_name: str  # the name clients use (KServe model name, OpenAI model id)
    max_model_len: int  # prompt plus output tokens at most

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The model's Hugging Face tokenizer (chat templates, token counts); None when the
        checkpoint ships none (prompts are then token ids)."""

    def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream a request's deltas; the last one has finished=True.

        Raises ValueError for bad input, Overloaded when admission control refuses and
        Unavailable when nothing can serve it, all before the first delta. Closing the
        iterator early (client gone) aborts the request and frees its KV blocks on every worker.
        """

    async def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; unknown ids are ignored."""

    def is_ready(self) -> bool:
        """Whether requests can be served (perhaps with some workers down: workers() says which)."""

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics: queue lengths, KV block usage, transfer counters (sums over
        the workers that are up)."""

    def workers(self) -> list[WorkerStatus]:
        """Each worker: up or not, and its own gauges (none when it is down)."""

    async def refresh(self) -> None:
        """Bring stats() up to date (a /metrics scrape calls it)."""

    async def drain(self, role: str, index: int, timeout_s: float) -> int:
        """Stop routing to a worker and move its requests to the others (ValueError naming what
        is wrong: no such worker, or nothing would serve); returns how many moved."""

    def undrain(self, role: str, index: int) -> None:
        """Route to a drained worker again."""

    async def migrate(self, request_id: str, to: int | None = None) -> Migration:
        """Move a decoding request to decode worker `to` (or the roomiest) with its KV; returns
        once it streams there. ValueError naming what is wrong (not in flight, not decoding,
        no such worker), Unavailable when no other decode worker is up, RuntimeError when it
        failed on the way (the request goes on where it was)."""

    async def take_steps(self) -> list[WorkerSteps]:
        """Each worker's engine steps since the last call (what each computed, how long it
        took as served); a worker that does not answer is left out."""


@dataclass(frozen=True)
class Migration:
    """A request live-migrated between decode workers (DisaggregatedBackend.migrate)."""

    request_id: str
    source: int  # decode worker indices
    destination: int
    num_tokens: int  # prompt and generated tokens when it moved (the KV of all but the newest copied)
    pause_s: float  # from the detach asked to the first token after it: what the stream paused
    copy_s: float  # of which the KV copy, from its start to the destination's confirmation


@dataclass(frozen=True)
class WorkerSteps:
    """The steps one worker's engine ran (Backend.take_steps)."""

    role: Role
    index: int  # within its role
    steps: list[StepRecord]


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the router last saw it, for per-worker gauges."""

    role: Role
    index: int  # within its role
    up: bool  # answered its last stats call and its engine runs
    stats: WorkerStats | None  # its gauges; None when it is down
    draining: bool = False  # taken out of routing (Backend.drain)

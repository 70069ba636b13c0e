"""One request's deltas from the backend to a frontend, with its metrics.

Both frontends read a request through `stream_deltas`. Closing it (the frontend's client
cancelled or disconnected) closes the backend's stream, which aborts the request and frees
its KV blocks on every worker. `Serving` is what the two frontends share: the backend, the
metrics, the prompt bounds, who may call, and the requests in flight, so that a shutdown can
wait for them and then cut the rest with an error that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from proto.errors import Overloaded, Unavailable
from proto.serving import FinishReason, TokenDelta
from router.backend import Backend
from router.metrics import ServerMetrics
from router.requests import BadRequest, GenerateRequest, PromptEncoder
from router.security import Security

SHUTDOWN_MESSAGE = "the server is shutting down"


@dataclass(eq=False)
class Serving:
    """The state both frontends share."""

    backend: Backend
    metrics: ServerMetrics
    encoder: PromptEncoder
    security: Security = Security()
    draining: bool = False  # new requests are refused (503 / UNAVAILABLE) while running ones finish
    cutting: bool = False  # the grace period is over: requests still running are aborted
    in_flight: set[str] = field(default_factory=set)  # request ids being streamed
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while in_flight is empty

    def __post_init__(self) -> None:
        self.idle.set()

    def check_open(self) -> None:
        """Unavailable once the server drains: no new request is started."""
        if self.draining:
            raise Unavailable(SHUTDOWN_MESSAGE)

    async def cut(self) -> None:
        """End every request still in flight: each ends with a retryable shutdown error."""
        self.cutting = True
        await asyncio.gather(*(self.backend.abort(r) for r in list(self.in_flight)))


class RequestFailed(RuntimeError):
    """The backend accepted a request, then ended it with an error or an abort.

    retryable: the failure is the server's state, not the request (a worker is down, the
    request was aborted server-side), so the same request may succeed later:
    gRPC UNAVAILABLE / HTTP 503 rather than INTERNAL / 500.
    """

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def _failure(delta: TokenDelta, serving: Serving) -> RequestFailed:
    if serving.cutting:
        return RequestFailed(f"{SHUTDOWN_MESSAGE}: the request was stopped before it finished", retryable=True)
    if delta.finish_reason is FinishReason.ABORT:
        return RequestFailed("the request was aborted by the server", retryable=True)
    return RequestFailed(f"the request failed: {delta.error or 'unknown error'}", retryable=delta.retryable)


async def stream_deltas(serving: Serving, frontend: str, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
    """Yield the request's deltas; the last has finished=True and finish_reason stop or length.

    Raises BadRequest (the backend refused the input), Overloaded, Unavailable (no worker,
    or the server drains), or RequestFailed (an "error" or "abort" delta: deltas before it
    have been yielded).
    """
    metrics = serving.metrics
    arrival_s = time.monotonic()
    first_token_s: float | None = None
    last_token_s = arrival_s  # the latest token's time, read only once there is a first
    num_tokens = 0
    outcome = "cancelled"  # unless the stream ends otherwise, the consumer closed it early
    metrics.in_flight.labels(frontend).inc()
    serving.in_flight.add(request.request_id)
    serving.idle.clear()
    try:
        serving.check_open()
        stream = serving.backend.generate(request)
        async with contextlib.aclosing(stream):
            async for delta in stream:
                if delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    outcome = delta.finish_reason
                    raise _failure(delta, serving)
                if delta.token_ids:
                    last_token_s = time.monotonic()
                    if first_token_s is None:
                        first_token_s = last_token_s
                        metrics.ttft_s.labels(frontend).observe(first_token_s - arrival_s)
                        metrics.prompt_tokens.labels(frontend).inc(delta.num_prompt_tokens)
                    num_tokens += len(delta.token_ids)
                    metrics.generation_tokens.labels(frontend).inc(len(delta.token_ids))
                if delta.finished:
                    outcome = delta.finish_reason or FinishReason.STOP
                yield delta
    except Overloaded:
        outcome = "overloaded"
        raise
    except Unavailable:
        outcome = "unavailable"
        raise
    except ValueError as exc:  # Backend.generate refused the input before the first delta
        outcome = "invalid"
        raise BadRequest(str(exc)) from None
    except RequestFailed:
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        metrics.in_flight.labels(frontend).dec()
        serving.in_flight.discard(request.request_id)
        if not serving.in_flight:
            serving.idle.set()
        metrics.count(frontend, outcome)
        if outcome in (FinishReason.STOP, FinishReason.LENGTH) and first_token_s is not None:
            metrics.e2e_s.labels(frontend).observe(last_token_s - arrival_s)
            if num_tokens > 1:
                metrics.tpot_s.labels(frontend).observe((last_token_s - first_token_s) / (num_tokens - 1))

"""One request's deltas from the backend to a frontend, with its metrics.

Both frontends read a request through `stream_deltas`. Closing it (the frontend's client
cancelled or disconnected, or the server is shutting down) closes the backend's stream,
which aborts the request and frees its KV blocks on every worker.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

from proto.serving import TokenDelta
from router.backend import Overloaded
from router.metrics import Metrics
from router.requests import BadRequest, GenerateRequest


class RequestFailed(RuntimeError):
    """The backend accepted a request, then ended it with an error or an abort.

    retryable: the failure is the server's state, not the request (a worker is down, the
    request was aborted server-side), so the same request may succeed later:
    gRPC UNAVAILABLE / HTTP 503 rather than INTERNAL / 500.
    """

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def _failure(delta: TokenDelta, backend) -> RequestFailed:
    if delta.finish_reason == "abort":
        return RequestFailed("the request was aborted by the server", retryable=True)
    return RequestFailed(f"the request failed: {delta.error or 'unknown error'}",
                         retryable=not backend.is_ready())


async def stream_deltas(backend, metrics: Metrics, frontend: str,
                        request: GenerateRequest) -> AsyncIterator[TokenDelta]:
    """Yield the request's deltas; the last has finished=True and finish_reason stop or length.

    Raises BadRequest (the backend refused the input), Overloaded, or RequestFailed (an
    "error" or "abort" delta: deltas before it have been yielded).
    """
    arrival_s = time.monotonic()
    first_token_s = last_token_s = None
    num_tokens = 0
    outcome = "cancelled"  # unless the stream ends otherwise, the consumer closed it early
    metrics.in_flight.labels(frontend).inc()
    try:
        stream = backend.generate(request.request_id, list(request.prompt_token_ids), request.params)
        async with contextlib.aclosing(stream):
            async for delta in stream:
                if delta.finish_reason in ("error", "abort"):
                    outcome = delta.finish_reason
                    raise _failure(delta, backend)
                if delta.token_ids:
                    last_token_s = time.monotonic()
                    if first_token_s is None:
                        first_token_s = last_token_s
                        metrics.ttft_s.labels(frontend).observe(first_token_s - arrival_s)
                        metrics.prompt_tokens.labels(frontend).inc(delta.num_prompt_tokens)
                    num_tokens += len(delta.token_ids)
                    metrics.generation_tokens.labels(frontend).inc(len(delta.token_ids))
                if delta.finished:
                    outcome = delta.finish_reason or "stop"
                yield delta
    except Overloaded:
        outcome = "overloaded"
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
        metrics.count(frontend, outcome)
        if outcome in ("stop", "length") and first_token_s is not None:
            metrics.e2e_s.labels(frontend).observe(last_token_s - arrival_s)
            if num_tokens > 1:
                metrics.tpot_s.labels(frontend).observe((last_token_s - first_token_s) / (num_tokens - 1))

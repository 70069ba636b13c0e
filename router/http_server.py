"""The OpenAI-compatible HTTP frontend (aiohttp), with /health and /metrics.

Errors are JSON bodies {"error": {"message", "type", "param", "code"}}: 400 bad input
(param names the field), 401 no valid API key, 404 unknown model or path, 413 a body too
large for any request that fits, 429 the queue is full, 500 the request failed on its own,
503 a worker is down or the server is shutting down (retry). Once a stream has started, an error is sent as one more
event, data: {"error": {...}}, followed by data: [DONE]. A client that disconnects cancels
its handler, which aborts the request in the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, astuple, fields

from aiohttp import web

from proto.errors import Overloaded, Unavailable
from proto.serving import StepRecord
from router.backend import DRAIN_TIMEOUT_S
from router.metrics import CONTENT_TYPE
from router.openai_protocol import (
    OpenAIRequest,
    chunk_body,
    parse_chat,
    parse_completion,
    response_body,
    usage,
    usage_chunk_body,
)
from router.requests import BadRequest, UnknownModel
from router.security import OPEN_HTTP_PATHS, UNAUTHORIZED
from router.streaming import RequestFailed, Serving, stream_deltas

FRONTEND = "http"
# Bodies up to this size are parsed on the event loop; larger ones on a worker thread.
INLINE_JSON_BYTES = 64 << 10
# A scrape waits this long for fresh backend stats, then shows the last ones (Prometheus'
# default scrape timeout is 10 s).
STATS_REFRESH_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


class HTTPError(Exception):
    """A response that is an error: raised anywhere in a handler, rendered by the middleware."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def http_error(exc: Exception) -> HTTPError:
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, UnknownModel):
        return HTTPError(404, "not_found_error", str(exc), exc.param, "model_not_found")
    if isinstance(exc, BadRequest):
        return HTTPError(400, "invalid_request_error", str(exc), exc.param)
    if isinstance(exc, Overloaded):
        return HTTPError(429, "overloaded_error", str(exc))
    if isinstance(exc, Unavailable):
        return HTTPError(503, "unavailable_error", str(exc))
    if isinstance(exc, RequestFailed):
        return (
            HTTPError(503, "unavailable_error", str(exc))
            if exc.retryable
            else HTTPError(500, "internal_error", str(exc))
        )
    if isinstance(exc, web.HTTPException):  # aiohttp's own: unknown path, wrong method
        return HTTPError(exc.status, "invalid_request_error", exc.reason)
    return HTTPError(500, "internal_error", f"internal error: {exc!r}")


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def parse_json(raw: bytes):
    """The body as JSON; BadRequest for anything that is not (invalid, or nested too deeply)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None


class HTTPFrontend:
    def __init__(self, serving: Serving):
        self.serving = serving
        self.backend = serving.backend
        self.metrics = serving.metrics
        self.created = int(time.time())

    def app(self) -> web.Application:
        # Larger bodies cannot hold a request that fits the context window: refused unread (413).
        app = web.Application(middlewares=[self._middleware], client_max_size=self.serving.encoder.max_request_bytes)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/admin/drain", self.drain)
        app.router.add_post("/admin/undrain", self.undrain)
        app.router.add_post("/admin/steps", self.steps)
        app.router.add_post("/admin/migrate", self.migrate)
        return app

    def _needs_key(self, path: str) -> bool:
        security = self.serving.security
        return path not in OPEN_HTTP_PATHS and not (path == "/metrics" and security.public_metrics)

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        try:
            if self._needs_key(request.path) and not self.serving.security.allows(request.headers.get("Authorization")):
                raise HTTPError(401, "invalid_request_error", UNAUTHORIZED, code="invalid_api_key")
            self.serving.check_open()
            return await handler(request)
        except Exception as exc:
            error = http_error(exc)
            if error.status == 500:
                log.error("%s %s failed", request.method, request.path, exc_info=exc)
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return web.json_response(error.body, status=error.status, headers=headers)

    async def health(self, request: web.Request) -> web.Response:
        """200 while requests are served: "ok" with every worker up, "degraded" with some down
        (which, and how many of each role are up); 503 when nothing can serve."""
        workers = self.backend.workers()
        down = [f"{w.role.value} worker {w.index}" for w in workers if not w.up]
        draining = [f"{w.role.value} worker {w.index}" for w in workers if w.draining]
        if not self.backend.is_ready():
            why = f"{', '.join(down)} down" if down else "a worker is down, broken or draining"
            raise HTTPError(503, "unavailable_error", f"the backend cannot serve requests: {why}")
        if not down and not draining:
            return web.json_response({"status": "ok"})
        up: dict[str, dict[str, int]] = {}
        for w in workers:
            counts = up.setdefault(w.role.value, {"up": 0, "total": 0})
            counts["up"] += w.up
            counts["total"] += 1
        body = {"status": "degraded", "down": down, "workers": up} if down else {"status": "ok"}
        return web.json_response(body | ({"draining": draining} if draining else {}))

    async def drain(self, request: web.Request) -> web.Response:
        """POST {"role": "prefill"|"decode", "index": N, "timeout_s": S?}: take the worker out of
        routing and move its requests to the others; answers once none is left on it."""
        role, index, body = await self._admin_target(request)
        timeout_s = body.get("timeout_s", DRAIN_TIMEOUT_S)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise BadRequest(f"timeout_s must be a positive number of seconds, got {timeout_s!r}", "timeout_s")
        try:
            moved = await self.backend.drain(role, index, float(timeout_s))
        except ValueError as exc:
            raise BadRequest(str(exc), "index") from None
        except TimeoutError as exc:
            raise HTTPError(504, "timeout_error", f"{exc}; it stays out of routing (POST /admin/undrain)") from None
        return web.json_response({"role": role, "index": index, "draining": True, "moved": moved})

    async def undrain(self, request: web.Request) -> web.Response:
        """POST {"role": ..., "index": N}: route to a drained worker again."""
        role, index, _ = await self._admin_target(request)
        try:
            self.backend.undrain(role, index)
        except ValueError as exc:
            raise BadRequest(str(exc), "index") from None
        return web.json_response({"role": role, "index": index, "draining": False})

    async def migrate(self, request: web.Request) -> web.Response:
        """POST {"request_id": ID, "to": N?}: move a decoding request to decode worker N (or
        the one with the most room) with its KV; answers once it streams there."""
        self._check_admin()
        body = parse_json(await request.read())
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        request_id, to = body.get("request_id"), body.get("to")
        if not isinstance(request_id, str) or not request_id:
            raise BadRequest(f"request_id must be a request's id (a string), got {request_id!r}", "request_id")
        if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 0):
            raise BadRequest(f"to must be a decode worker's index (an integer >= 0), got {to!r}", "to")
        try:
            moved = await self.backend.migrate(request_id, to)
        except ValueError as exc:
            raise BadRequest(str(exc), "to" if "decode worker" in str(exc) else "request_id") from None
        except (Unavailable, RuntimeError) as exc:
            raise HTTPError(503, "unavailable_error", f"{exc}; the request goes on where it was") from None
        return web.json_response(asdict(moved))

    async def steps(self, request: web.Request) -> web.Response:
        """POST: take every worker's engine steps since the last call, for `tandem profile
        --from-steps` (a refit of the latency profile to what this server ran)."""
        self._check_admin()
        workers = await self.backend.take_steps()
        return web.json_response(
            {
                "fields": [f.name for f in fields(StepRecord)],
                "workers": [
                    {"role": w.role.value, "index": w.index, "steps": [astuple(s) for s in w.steps]} for w in workers
                ],
            }
        )

    def _check_admin(self) -> None:
        """Admin calls need API keys to be set: on an open server, anyone could take every
        worker out of routing."""
        if not self.serving.security.api_keys:
            raise HTTPError(403, "permission_error", "admin endpoints need API keys: start the server with --api-key")

    async def _admin_target(self, request: web.Request) -> tuple[str, int, dict]:
        """An admin call's body and the worker it names."""
        self._check_admin()
        body = parse_json(await request.read())
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        role, index = body.get("role"), body.get("index")
        if role not in ("prefill", "decode"):
            raise BadRequest(f"role must be 'prefill' or 'decode', got {role!r}", "role")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise BadRequest(f"index must be a worker's index (an integer >= 0), got {index!r}", "index")
        return role, index, body

    async def metrics_text(self, request: web.Request) -> web.Response:
        # The disaggregated backend caches its workers' stats between requests: fetch them
        # now so that an idle server's gauges are current.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.backend.refresh(), STATS_REFRESH_TIMEOUT_S)
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    def _model_card(self) -> dict:
        return {
            "id": self.backend.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tandem",
            "max_model_len": self.backend.max_model_len,
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.backend.model_name:
            raise UnknownModel(f"model {request.match_info['model']!r} is not served here", "model")
        return web.json_response(self._model_card())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def _generate(self, http_request: web.Request, parse) -> web.StreamResponse:
        try:
            encoder = self.serving.encoder
            try:
                raw = await http_request.read()
            except web.HTTPRequestEntityTooLarge:
                raise HTTPError(
                    413,
                    "invalid_request_error",
                    f"the request body is larger than {encoder.max_request_bytes} bytes, more "
                    f"than any request that fits the context window of {self.backend.max_model_len} "
                    f"tokens",
                ) from None
            body = parse_json(raw) if len(raw) <= INLINE_JSON_BYTES else await asyncio.to_thread(parse_json, raw)
            request = await parse(body, self.backend, encoder)
        except BadRequest as exc:
            self.metrics.count(FRONTEND, "not_found" if isinstance(exc, UnknownModel) else "invalid")
            raise
        deltas = stream_deltas(self.serving, FRONTEND, request.generate)
        async with contextlib.aclosing(deltas):
            # The first delta comes before any response byte, so refusals (overload, bad
            # input found by the backend) are still plain JSON errors with their status.
            first = await anext(deltas)
            if request.stream:
                return await self._stream(http_request, request, first, deltas)
            parts, num_tokens, delta = [first.text], len(first.token_ids), first
            async for delta in deltas:
                parts.append(delta.text)
                num_tokens += len(delta.token_ids)
            counts = usage(len(request.generate.prompt_token_ids), num_tokens)
            return web.json_response(response_body(request, "".join(parts), delta.finish_reason, counts))

    async def _stream(self, http_request: web.Request, request: OpenAIRequest, first, deltas) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http_request)
        # A reset means the client is gone: the caller then closes `deltas`, aborting the request.
        with contextlib.suppress(ConnectionResetError):
            try:
                await self._write_chunks(response, request, first, deltas)
            except ConnectionResetError:
                raise
            except Exception as exc:  # the status line is sent: report the error in the stream
                error = http_error(exc)
                if error.status == 500:
                    log.error("%s %s failed while streaming", http_request.method, http_request.path, exc_info=exc)
                await response.write(sse(error.body))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response

    async def _write_chunks(self, response: web.StreamResponse, request: OpenAIRequest, first, deltas) -> None:
        num_tokens, is_first, delta = 0, True, first
        while True:
            num_tokens += len(delta.token_ids)
            if delta.text or delta.finished:
                await response.write(sse(chunk_body(request, delta.text, delta.finish_reason, is_first)))
                is_first = False
            if delta.finished:
                break
            delta = await anext(deltas)
        if request.include_usage:
            counts = usage(len(request.generate.prompt_token_ids), num_tokens)
            await response.write(sse(usage_chunk_body(request, counts)))

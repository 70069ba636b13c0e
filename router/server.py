"""Starts both frontends over one backend and stops them with a drain.

    handle = await serve(backend, http_port=8000, grpc_port=8001)  # 0 = any free port
    ...
    await handle.stop(grace_s=5.0)

Both servers run on the caller's event loop. The backend is the caller's: stop() leaves it
running (and closing it is the caller's job). While serving, the backend's worker stats and
health are refreshed every STATS_INTERVAL_S, so that /health and the gRPC health service
turn unhealthy within one interval of a worker breaking, whether requests arrive or not.

A shutdown (stop):
  1. health says NOT_SERVING; new requests get 503 / UNAVAILABLE (the ports stay open, so a
     client learns why instead of meeting a refused connection);
  2. running requests have grace_s to finish;
  3. those still running are cut: each ends with a retryable error (an error event then
     [DONE] on HTTP, an error response on a gRPC stream, UNAVAILABLE on ModelInfer), and
     gRPC streams end with status OK;
  4. the servers close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib.metadata import PackageNotFoundError, version

import grpc
from aiohttp import web

from router.backend import STATS_INTERVAL_S
from router.grpc_server import HealthServicer, InferenceServicer, start_grpc_server
from router.http_server import HTTPFrontend
from router.metrics import ServerMetrics
from router.requests import PromptEncoder
from router.security import Security
from router.streaming import Serving

DEFAULT_HTTP_PORT = 8000  # OpenAI-compatible HTTP, as vLLM and Triton's HTTP port
DEFAULT_GRPC_PORT = 8001  # KServe v2 gRPC, as Triton
DEFAULT_HOST = "127.0.0.1"  # this machine only, unless asked (tandem serve --host)
# After the cut, requests have this long to send their last words before the servers close.
CUT_TIMEOUT_S = 2.0
# aiohttp's cleanup waits this much longer for each handler still running before cancelling it.
HTTP_CLOSE_TIMEOUT_S = 0.05
log = logging.getLogger(__name__)


def _server_version() -> str:
    try:
        return version("tandem")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class ServerHandle:
    """The running servers: their bound ports, and stop()."""

    def __init__(
        self,
        serving: Serving,
        http_port: int,
        grpc_port: int,
        runner: web.AppRunner,
        grpc_server: grpc.aio.Server,
        servicer: InferenceServicer,
        health: HealthServicer,
    ):
        self.serving = serving
        self.http_port = http_port
        self.grpc_port = grpc_port
        self._runner = runner
        self._grpc_server = grpc_server
        self._servicer = servicer
        self._health = health
        self._watcher = asyncio.create_task(self._watch_backend())

    async def _watch_backend(self) -> None:
        """Keep the backend's health and worker stats current, requests or not."""
        while True:
            with contextlib.suppress(Exception):  # a worker that does not answer is marked down, not raised
                await asyncio.wait_for(self.serving.backend.refresh(), STATS_INTERVAL_S * 10)
                await self._health.publish()
            await asyncio.sleep(STATS_INTERVAL_S)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, give running ones grace_s to finish, then cut the rest.

        Cut requests end with a retryable error and are aborted in the backend, so their KV
        blocks are freed.
        """
        self._watcher.cancel()
        await self._health.enter_graceful_shutdown()
        self.serving.draining = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.serving.idle.wait(), grace_s)
        if self.serving.in_flight:
            log.warning(
                "shutdown: cutting %d request(s) still running after %g s", len(self.serving.in_flight), grace_s
            )
            await self.serving.cut()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.serving.idle.wait(), CUT_TIMEOUT_S)
        self._servicer.closing.set()  # open gRPC streams end with status OK
        await asyncio.gather(self._grpc_server.stop(CUT_TIMEOUT_S), self._runner.cleanup())
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher


async def serve(
    backend,
    http_port: int = DEFAULT_HTTP_PORT,
    grpc_port: int = DEFAULT_GRPC_PORT,
    host: str = DEFAULT_HOST,
    security: Security = Security(),
) -> ServerHandle:
    """Start the OpenAI HTTP and KServe gRPC frontends; returns once both are listening."""
    serving = Serving(
        backend, ServerMetrics(backend), PromptEncoder(backend.tokenizer, backend.max_model_len), security
    )
    http = HTTPFrontend(serving)
    # handler_cancellation: a client that disconnects cancels its handler, aborting its request.
    runner = web.AppRunner(
        http.app(), handler_cancellation=True, shutdown_timeout=HTTP_CLOSE_TIMEOUT_S, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, host, http_port, ssl_context=security.ssl_context())
    await site.start()
    bound_http_port = runner.addresses[0][1]
    try:
        grpc_server, servicer, health, bound_grpc_port = await start_grpc_server(
            serving, host, grpc_port, _server_version()
        )
    except BaseException:
        await runner.cleanup()
        raise
    return ServerHandle(serving, bound_http_port, bound_grpc_port, runner, grpc_server, servicer, health)

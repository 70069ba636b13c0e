"""Starts both frontends over one backend and stops them with a drain.

    handle = await serve(backend, http_port=8000, grpc_port=8001)  # 0 = any free port
    ...
    await handle.stop(grace_s=5.0)

Both servers run on the caller's event loop. The backend is the caller's: stop() leaves it
running (and closing it is the caller's job).
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version

import grpc
from aiohttp import web

from router.grpc_server import HealthServicer, start_grpc_server
from router.http_server import HTTPFrontend
from router.metrics import Metrics

DEFAULT_HTTP_PORT = 8000  # OpenAI-compatible HTTP, as vLLM and Triton's HTTP port
DEFAULT_GRPC_PORT = 8001  # KServe v2 gRPC, as Triton
# stop() waits out the grace period itself; after it aiohttp's cleanup waits this much
# longer for each handler still running before cancelling it (0 would mean forever).
HTTP_CLOSE_TIMEOUT_S = 0.05


def _server_version() -> str:
    try:
        return version("tandem")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class ServerHandle:
    """The running servers: their bound ports, and stop()."""

    def __init__(self, http_port: int, grpc_port: int, runner: web.AppRunner, http: HTTPFrontend,
                 grpc_server: grpc.aio.Server, health: HealthServicer):
        self.http_port = http_port
        self.grpc_port = grpc_port
        self._runner = runner
        self._http = http
        self._grpc_server = grpc_server
        self._health = health

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, give running ones grace_s to finish, then cancel the rest.

        Cancelled requests are aborted in the backend, so their KV blocks are freed.
        """
        await self._health.enter_graceful_shutdown()
        self._http.draining = True
        await asyncio.gather(self._grpc_server.stop(grace_s), self._stop_http(grace_s))

    async def _stop_http(self, grace_s: float) -> None:
        for site in list(self._runner.sites):
            await site.stop()  # stop accepting connections
        try:
            await asyncio.wait_for(self._http.idle.wait(), grace_s)
        except asyncio.TimeoutError:
            pass  # cleanup() cancels the handlers still running
        await self._runner.cleanup()


async def serve(backend, http_port: int = DEFAULT_HTTP_PORT, grpc_port: int = DEFAULT_GRPC_PORT,
                host: str = "0.0.0.0") -> ServerHandle:
    """Start the OpenAI HTTP and KServe gRPC frontends; returns once both are listening."""
    metrics = Metrics(backend)
    http = HTTPFrontend(backend, metrics)
    # handler_cancellation: a client that disconnects cancels its handler, aborting its request.
    runner = web.AppRunner(http.app(), handler_cancellation=True, shutdown_timeout=HTTP_CLOSE_TIMEOUT_S,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, http_port)
    await site.start()
    bound_http_port = runner.addresses[0][1]
    try:
        grpc_server, health, bound_grpc_port = await start_grpc_server(backend, metrics, host, grpc_port,
                                                                       _server_version())
    except BaseException:
        await runner.cleanup()
        raise
    return ServerHandle(bound_http_port, bound_grpc_port, runner, http, grpc_server, health)

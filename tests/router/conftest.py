"""A tiny model served by both frontends on an event loop thread, for real clients to call.

tritonclient and openai are synchronous clients, so the servers run on their own thread's
event loop and the tests call them from the main thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineConfig
from proto.errors import Overloaded, Unavailable
from proto.serving import TokenDelta
from router.local_backend import LocalBackend
from router.requests import PromptEncoder
from router.server import ServerHandle, serve


class ControlledBackend:
    """LocalBackend passed through, unless a test asks for a failure.

    fail: None, "overloaded" (refuse at admission), "unavailable" (refuse: no worker up),
    "error" (an error delta after the first text delta that is the request's own, as when
    its sampling fails), "worker_died" (the same, but retryable: its worker died mid-stream)
    or "abort" (the server aborts the request there, as on a transfer timeout).
    ready: what is_ready() says.
    """

    def __init__(self, inner: LocalBackend):
        self.inner = inner
        self.model_name = inner.model_name
        self.max_model_len = inner.max_model_len
        self.fail: str | None = None
        self.ready = True
        self.num_refreshes = 0

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    async def generate(self, request):
        if self.fail == "overloaded":
            raise Overloaded("8 requests are already waiting (max_waiting=8); retry later")
        if self.fail == "unavailable":
            raise Unavailable("no decode worker is up (of 1)")
        stream = self.inner.generate(request)
        try:
            async for delta in stream:
                yield delta
                if self.fail in ("error", "worker_died", "abort") and delta.text and not delta.finished:
                    reason, error = {
                        "error": ("error", "sampling failed: bad row"),
                        "worker_died": ("error", "decode worker 0 died"),
                        "abort": ("abort", None),
                    }[self.fail]
                    yield TokenDelta(
                        request.request_id,
                        (),
                        "",
                        True,
                        reason,
                        delta.num_prompt_tokens,
                        0,
                        error,
                        retryable=self.fail == "worker_died",
                    )
                    return
        finally:
            await stream.aclose()

    async def abort(self, request_id):
        await self.inner.abort(request_id)

    async def refresh(self):
        """The optional hook /metrics calls so that cached worker stats are current."""
        self.num_refreshes += 1

    def is_ready(self):
        return self.ready

    def stats(self):
        return self.inner.stats()

    def workers(self):
        return self.inner.workers()

    async def drain(self, role, index, timeout_s):
        return await self.inner.drain(role, index, timeout_s)

    def undrain(self, role, index):
        self.inner.undrain(role, index)

    async def take_steps(self):
        return await self.inner.take_steps()


@dataclass
class Served:
    backend: ControlledBackend
    handle: ServerHandle
    loop: asyncio.AbstractEventLoop

    @property
    def encoder(self) -> PromptEncoder:
        """The bounds the servers apply (the same object's twin: built from the same backend)."""
        return PromptEncoder(self.backend.tokenizer, self.backend.max_model_len)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.handle.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.handle.grpc_port}"

    def run(self, coro, timeout_s: float = 30.0):
        """Run a coroutine on the servers' loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics, 0 when it is absent."""
        text = urllib.request.urlopen(self.http_url + "/metrics", timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def wait_all_blocks_free(self, timeout_s: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.backend.stats()
            if stats["num_running"] == stats["num_waiting"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"KV blocks still in use: {stats}")
            time.sleep(0.02)


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    backend = ControlledBackend(LocalBackend(tiny_llama_dir, EngineConfig(max_num_batched_tokens=64)))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="servers", daemon=True)
    thread.start()
    handle = asyncio.run_coroutine_threadsafe(serve(backend, 0, 0, "127.0.0.1"), loop).result(30)
    served = Served(backend, handle, loop)
    yield served
    served.run(handle.stop(0.5))
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
    backend.inner.close()


@pytest.fixture
def backend(served):
    """The served backend, its failure switches reset after each test."""
    yield served.backend
    served.backend.fail = None
    served.backend.ready = True

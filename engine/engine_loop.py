"""Runs an LLMEngine on its own thread so that asyncio servers and actors can drive it.

Callers submit, reserve, admit and abort from any thread; the loop thread steps the engine
whenever it has work and hands each request's outputs to that request's callback. Calls
and steps are serialised by one lock, so the engine itself stays single-threaded. KV
transfer threads never wait for a step: release_soon() only queues the request id.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Awaitable, Callable

from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from proto.serving import TokenDelta

# Called with a step's schedule before it runs; returns the per-layer hook for that step
# and the payload that tensor-parallel followers receive with it (see engine/parallel.py).
BeforeRun = Callable[[SchedulerOutput], tuple[Callable[[int], None] | None, object]]


class Overloaded(RuntimeError):
    """Admission control refused a request: too many are already waiting."""


def to_delta(out: RequestOutput) -> TokenDelta:
    return TokenDelta(request_id=out.request_id, token_ids=tuple(out.new_token_ids), text=out.new_text,
                      finished=out.finished, finish_reason=out.finish_reason,
                      num_prompt_tokens=len(out.prompt_token_ids), num_cached_tokens=out.num_cached_tokens)


def final_delta(request_id: str, reason: str, error: str | None = None) -> TokenDelta:
    return TokenDelta(request_id, (), "", True, reason, 0, 0, error=error)


async def delta_stream(start: Callable[[Callable[[TokenDelta], None]], Awaitable[None]],
                       stop: Callable[[], Awaitable[None]]) -> AsyncIterator[TokenDelta]:
    """Bridge a request's deltas from the engine thread into the caller's event loop.

    start(on_delta) begins the request; deltas are yielded until the final one. If the
    caller stops iterating first (client gone, cancelled), stop() aborts the request.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
    await start(lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta))
    finished = False
    try:
        while not finished:
            delta = await queue.get()
            finished = delta.finished
            yield delta
    finally:
        if not finished:
            await stop()


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, before_run: BeforeRun | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.before_run = before_run
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._callbacks: dict[str, Callable[[TokenDelta], None]] = {}
        self._releases: list[str] = []  # appended by KV transfer threads, drained by the loop
        self._releases_lock = threading.Lock()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def check_running(self) -> None:
        """Raise RuntimeError (naming why) once the loop stopped or its engine broke."""
        if self._error is not None or self._stopping:
            raise RuntimeError(f"engine loop is not running: {self._error or 'stopped'}")

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams,
               on_delta: Callable[[TokenDelta], None], hold_blocks: bool = False) -> None:
        """Queue a request. Bad input raises ValueError here, before anything is queued."""
        with self._lock:
            self.check_running()
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.engine.scheduler.waiting)} requests are already waiting "
                                 f"(max_waiting={self.max_waiting}); retry later")
            self.engine.add_request(request_id, prompt, params, hold_blocks=hold_blocks)
            self._callbacks[request_id] = on_delta
            self._work.notify()

    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
        """Decode side: blocks for a prompt prefilled elsewhere (see LLMEngine.reserve)."""
        with self._lock:
            self.check_running()
            try:
                return self.engine.reserve(request_id, prompt, params)
            except RuntimeError as exc:  # no slot or no blocks right now
                raise Overloaded(str(exc)) from exc

    def admit(self, request_id: str, first_token_id: int, on_delta: Callable[[TokenDelta], None]) -> None:
        """Decode side: the KV arrived; stream from the first token on."""
        with self._lock:
            self.check_running()
            out = self.engine.admit(request_id, first_token_id)
            if not out.finished:
                self._callbacks[request_id] = on_delta
            self._work.notify()
        on_delta(to_delta(out))

    def abort(self, request_id: str) -> None:
        """Drop a request and free its blocks (held ones wait for release_soon); its
        callback gets a final "abort" delta."""
        with self._lock:
            callback = self._callbacks.pop(request_id, None)
            self.engine.abort(request_id)
        if callback is not None:
            callback(final_delta(request_id, "abort"))

    def release_soon(self, request_id: str) -> None:
        """Free a held request's blocks at the loop's next turn. Safe from any thread, never blocks long."""
        with self._releases_lock:
            self._releases.append(request_id)
        if self._lock.acquire(blocking=False):
            try:
                self._work.notify()
            finally:
                self._lock.release()

    def stats(self) -> dict[str, float]:
        # Gauges read with len() only, so no lock: a caller polling them (the router, every
        # fraction of a second, from an actor's event loop) never waits for a step.
        bm, sched = self.engine.block_manager, self.engine.scheduler
        return {"num_waiting": len(sched.waiting), "num_running": len(sched.running),
                "num_reserved": len(sched.reserved), "num_held": len(sched.held),
                "num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
                "kv_usage": bm.usage, "num_preemptions": sched.num_preemptions_total}

    def fail(self, reason: BaseException) -> None:
        """Stop for good because something the engine depends on broke (a lost tensor-parallel
        rank): unfinished requests end with an error delta naming `reason`."""
        with self._lock:
            self._error = self._error or reason
            self._stopping = True
            self._work.notify()

    def close(self) -> None:
        """Stop the thread after its current step; unfinished requests end with an error delta."""
        with self._lock:
            self._stopping = True
            self._work.notify()
        self._thread.join()

    def _drain_releases(self) -> None:
        with self._releases_lock:
            releases, self._releases = self._releases, []
        for request_id in releases:
            self.engine.release(request_id)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    self._drain_releases()
                    while not self._stopping and not self.engine.has_unfinished() and not self._releases:
                        self._work.wait(timeout=0.05)
                    if self._stopping:
                        break
                    self._drain_releases()
                    out = self.engine.schedule()
                    hook, payload = self.before_run(out) if self.before_run is not None else (None, None)
                    outputs = self.engine.run(out, hook, step_payload=payload)
                    deliveries = [(self._callbacks.get(o.request_id), o) for o in outputs]
                    for o in outputs:
                        if o.finished:
                            self._callbacks.pop(o.request_id, None)
                for callback, out in deliveries:
                    if callback is not None:
                        callback(to_delta(out))
        except BaseException as exc:  # the engine broke: fail every request, never hang them
            self._error = exc
        self._fail_all(self._error or RuntimeError("engine loop stopped"))

    def _fail_all(self, reason: BaseException) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, {}
            for request_id in callbacks:
                self.engine.abort(request_id)
        for request_id, callback in callbacks.items():
            callback(final_delta(request_id, "error", str(reason)))

"""Runs an LLMEngine on its own thread so that asyncio servers and actors can drive it.

Callers submit and abort from any thread; the loop thread steps the engine whenever it has
work and hands each request's outputs to that request's callback. add/abort and step are
serialised by one lock, so the engine itself stays single-threaded.
"""

from __future__ import annotations

import threading
from typing import Callable

from engine import LLMEngine, RequestOutput, SamplingParams
from proto.serving import TokenDelta


class Overloaded(RuntimeError):
    """Admission control refused a request: too many are already waiting."""


def to_delta(out: RequestOutput) -> TokenDelta:
    return TokenDelta(request_id=out.request_id, token_ids=tuple(out.new_token_ids), text=out.new_text,
                      finished=out.finished, finish_reason=out.finish_reason,
                      num_prompt_tokens=len(out.prompt_token_ids), num_cached_tokens=out.num_cached_tokens)


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._callbacks: dict[str, Callable[[TokenDelta], None]] = {}
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams,
               on_delta: Callable[[TokenDelta], None]) -> None:
        """Queue a request. Bad input raises ValueError here, before anything is queued."""
        with self._lock:
            if self._error is not None or self._stopping:
                raise RuntimeError(f"engine loop is not running: {self._error or 'stopped'}")
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.engine.scheduler.waiting)} requests are already waiting "
                                 f"(max_waiting={self.max_waiting}); retry later")
            self.engine.add_request(request_id, prompt, params)
            self._callbacks[request_id] = on_delta
            self._work.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request and free its blocks; its callback gets a final "abort" delta."""
        with self._lock:
            callback = self._callbacks.pop(request_id, None)
            self.engine.abort(request_id)
        if callback is not None:
            callback(TokenDelta(request_id, (), "", True, "abort", 0, 0))

    def stats(self) -> dict[str, float]:
        bm = self.engine.block_manager
        return {"num_waiting": len(self.engine.scheduler.waiting), "num_running": len(self.engine.scheduler.running),
                "num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks, "kv_usage": bm.usage,
                "num_preemptions": self.engine.scheduler.num_preemptions_total}

    def close(self) -> None:
        """Stop the thread after its current step; unfinished requests end with an error delta."""
        with self._lock:
            self._stopping = True
            self._work.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self.engine.has_unfinished():
                        self._work.wait()
                    if self._stopping:
                        break
                    outputs = self.engine.step()
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
            callback(TokenDelta(request_id, (), "", True, "error", 0, 0, error=str(reason)))

"""The prefill loop, testable without Ray.

A request's lifecycle on a prefill worker:

 1. prefill(): joins the engine with hold_blocks (and max_tokens=1), waiting with the others;
 2. its prompt runs in chunks; just before the final chunk's step runs, the KV transfer to
    the decode worker's reserved blocks starts (the block list is complete then);
 3. in that step, each layer is pushed as soon as its K/V are stored (layer-wise overlap);
 4. the first token is sampled and returned to the caller;
 5. the transfer ends (done, failed, cancelled or past its deadline) and gives the blocks
    back through on_release, which frees them on the engine thread.
An abort before step 2 frees the blocks at once; after it, it cancels the transfer and
the blocks come back through step 5.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.engine_loop import EngineLoop
from engine.scheduler import SchedulerOutput
from kv_transfer import KVSender, Transfer
from proto.serving import KVHandle, PrefillResult, TokenDelta


class PrefillFailed(RuntimeError):
    """The prompt could not be prefilled (aborted, or the engine stopped)."""


class PrefillWorker:
    def __init__(self, model_dir: str | Path, engine_config: EngineConfig, kv_backend: str,
                 transfer_timeout_s: float = 30.0):
        self.engine = LLMEngine(model_dir, engine_config)
        self.transfer_timeout_s = transfer_timeout_s
        self.sender = KVSender(kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout)
        self._lock = threading.Lock()
        self._pending: dict[str, KVHandle] = {}  # submitted, transfer not started yet
        self._transfers: dict[str, Transfer] = {}  # started, blocks not released yet
        self.loop = EngineLoop(self.engine, before_run=self._before_run)

    @property
    def layout(self):
        return self.engine.kv_cache.layout

    def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                handle: KVHandle, on_done: Callable[[PrefillResult | Exception], None]) -> None:
        """Prefill a prompt and push its KV to `handle`; on_done gets the first token (or an error)."""
        arrival = time.monotonic()
        # One token, whatever it is: stop conditions and text are the decode worker's job.
        first_only = replace(params, max_tokens=1, stop=(), stop_token_ids=(), ignore_eos=True)

        def on_delta(delta: TokenDelta) -> None:
            if delta.finish_reason in ("abort", "error"):
                on_done(PrefillFailed(delta.error or f"prefill of {request_id} was {delta.finish_reason}ed"))
            elif delta.token_ids:
                on_done(PrefillResult(request_id, delta.token_ids[0], delta.num_cached_tokens,
                                      time.monotonic() - arrival))

        with self._lock:
            self._pending[request_id] = handle
        try:
            self.loop.submit(request_id, prompt_token_ids, first_only, on_delta, hold_blocks=True)
        except BaseException:
            with self._lock:
                self._pending.pop(request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        with self._lock:
            not_started = self._pending.pop(request_id, None) is not None
            transfer = self._transfers.get(request_id)
        self.loop.abort(request_id)
        if not_started:
            self.loop.release_soon(request_id)  # nothing ever read the blocks
        elif transfer is not None:
            transfer.cancel("request aborted")  # blocks come back through on_release

    def _before_run(self, out: SchedulerOutput) -> Callable[[int], None] | None:
        """Runs on the engine thread: start the transfers of prompts this step completes."""
        starting = []
        for item in out.scheduled:
            request_id = item.seq.request_id
            if not item.samples:
                continue
            with self._lock:
                handle = self._pending.pop(request_id, None)
            if handle is None:
                continue
            transfer = self.sender.start(request_id, item.seq.block_ids, handle.endpoints,
                                         self.transfer_timeout_s, on_release=self._released(request_id))
            with self._lock:
                if not transfer.blocks_released:
                    self._transfers[request_id] = transfer
            starting.append(request_id)
        if not starting:
            return None
        return lambda layer_idx: [self.sender.push_layer(r, layer_idx) for r in starting]

    def _released(self, request_id: str) -> Callable[[tuple[int, ...]], None]:
        def on_release(_block_ids: tuple[int, ...]) -> None:
            with self._lock:
                self._transfers.pop(request_id, None)
            self.loop.release_soon(request_id)
        return on_release

    def stats(self) -> dict[str, float]:
        with self._lock:
            num_transfers = len(self._transfers)
        return {**self.loop.stats(), "num_transfers": num_transfers}

    def close(self) -> None:
        self.loop.close()
        self.sender.close()

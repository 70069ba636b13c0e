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

With tensor parallelism the worker is tp processes. Rank 0 (PrefillWorker) schedules;
the transfers that start in a step travel with it to the other ranks (PrefillFollower),
each of which starts its own part (its KV heads) of the same transfers and pushes its
layers. Rank 0 frees a request's blocks only once every rank's part has released them
(release_part); a follower reports its releases to rank 0 through on_released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from engine import EngineConfig, LLMEngine
from engine.engine_loop import EngineLoop
from engine.scheduler import SchedulerOutput
from kv_transfer import KVSender, Transfer
from proto.serving import FinishReason, GenerateRequest, KVHandle, PrefillResult, TokenDelta, WorkerStats


class PrefillFailed(RuntimeError):
    """The prompt could not be prefilled (aborted, or the engine stopped)."""


@dataclass(frozen=True)
class TransferStart:
    """A KV transfer that starts in a step; every tensor-parallel rank sends its part."""

    request_id: str
    block_ids: tuple[int, ...]  # source blocks: the same ids on every rank
    endpoints: tuple[str, ...]  # the decode worker's KV receivers


def start_transfers(
    sender: KVSender, starts: list[TransferStart], timeout_s: float, on_release: Callable[[str], None]
) -> tuple[Callable[[int], None], dict[str, Transfer]]:
    """Start this rank's part of each transfer; returns the per-layer push hook and the transfers."""
    transfers = {
        s.request_id: sender.start(
            s.request_id, s.block_ids, s.endpoints, timeout_s, on_release=_released(on_release, s.request_id)
        )
        for s in starts
    }
    request_ids = [s.request_id for s in starts]

    def push(layer_idx: int) -> None:
        for request_id in request_ids:
            sender.push_layer(request_id, layer_idx)

    return push, transfers


def _released(on_release: Callable[[str], None], request_id: str) -> Callable[[tuple[int, ...]], None]:
    """A transfer's on_release that tells `on_release` which request's blocks came back."""
    return lambda _block_ids: on_release(request_id)


class PrefillWorker:
    def __init__(
        self,
        model_dir: str | Path,
        engine_config: EngineConfig,
        kv_backend: str,
        transfer_timeout_s: float = 30.0,
        dist_init: str | None = None,
        *,
        kv_secret: bytes,
    ):
        """dist_init: with tensor_parallel_size > 1, the process group address all ranks join.
        kv_secret: the deployment's (kv_transfer/auth.py); KV goes only to decode workers holding it."""
        self.engine = LLMEngine(model_dir, engine_config, tp_rank=0, dist_init=dist_init)
        self.tp_size = engine_config.tensor_parallel_size
        self.transfer_timeout_s = transfer_timeout_s
        self.sender = KVSender(kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout, secret=kv_secret)
        self._lock = threading.Lock()
        self._pending: dict[str, KVHandle] = {}  # submitted, transfer not started yet
        self._transfers: dict[str, Transfer] = {}  # rank 0's part started, blocks not released yet
        self._parts_left: dict[str, int] = {}  # ranks whose part still holds the blocks
        # Aborted while their transfer was being started (between _before_run's two critical
        # sections): cancelled as soon as the transfer object exists.
        self._cancel_on_start: set[str] = set()
        self.loop = EngineLoop(self.engine, before_run=self._before_run)

    @property
    def layout(self):
        return self.engine.kv_cache.layout

    def prefill(
        self, request: GenerateRequest, handle: KVHandle, on_done: Callable[[PrefillResult | Exception], None]
    ) -> None:
        """Prefill a prompt and push its KV to `handle`; on_done gets the first token (or an error)."""
        request_id = request.request_id
        # One token, whatever it is: stop conditions and text are the decode worker's job.
        first_only = replace(request.params, max_tokens=1, stop=(), stop_token_ids=(), ignore_eos=True)

        def on_delta(delta: TokenDelta) -> None:
            if delta.finish_reason in (FinishReason.ABORT, FinishReason.ERROR):
                if delta.finish_reason is FinishReason.ERROR:
                    self.abort(request_id)  # a transfer that started stops; its blocks come back
                on_done(PrefillFailed(delta.error or f"prefill of {request_id} was {delta.finish_reason}ed"))
            elif delta.token_ids:
                on_done(PrefillResult(request_id, delta.token_ids[0]))

        with self._lock:
            self._pending[request_id] = handle
        try:
            self.loop.submit(request_id, list(request.prompt_token_ids), first_only, on_delta, hold_blocks=True)
        except BaseException:
            with self._lock:
                self._pending.pop(request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        with self._lock:
            not_started = self._pending.pop(request_id, None) is not None
            transfer = self._transfers.get(request_id)
            if not not_started and transfer is None and request_id in self._parts_left:
                self._cancel_on_start.add(request_id)
        self.loop.abort(request_id)
        if not_started:
            self.loop.release_soon(request_id)  # nothing ever read the blocks
        elif transfer is not None:
            transfer.cancel("request aborted")  # blocks come back through on_release

    def _before_run(self, out: SchedulerOutput) -> tuple[Callable[[int], None] | None, list[TransferStart] | None]:
        """Runs on the engine thread: start the transfers of prompts this step completes."""
        starts = []
        with self._lock:
            for item in out.scheduled:
                handle = self._pending.pop(item.seq.request_id, None) if item.samples else None
                if handle is not None:
                    starts.append(TransferStart(item.seq.request_id, tuple(item.seq.block_ids), handle.endpoints))
                    self._parts_left[item.seq.request_id] = self.tp_size
        if not starts:
            return None, None
        hook, transfers = start_transfers(self.sender, starts, self.transfer_timeout_s, self.release_part)
        with self._lock:
            self._transfers.update((r, t) for r, t in transfers.items() if r in self._parts_left)
            cancelled = [transfers[r] for r in self._cancel_on_start & transfers.keys()]
            self._cancel_on_start -= transfers.keys()
        for transfer in cancelled:
            transfer.cancel("request aborted")  # blocks come back through on_release
        return hook, starts

    def release_part(self, request_id: str) -> None:
        """One rank's part of a transfer let go of the blocks; the last one frees them."""
        with self._lock:
            left = self._parts_left.get(request_id, 0) - 1
            if left > 0:
                self._parts_left[request_id] = left
                return
            self._parts_left.pop(request_id, None)
            self._transfers.pop(request_id, None)
        self.loop.release_soon(request_id)

    def stats(self) -> WorkerStats:
        """Raises Unavailable once the engine broke: the router then stops picking this worker."""
        self.loop.check_running()
        with self._lock:
            num_transfers = len(self._transfers)
        return self.loop.stats(num_transfers)

    def close(self) -> None:
        self.loop.close()
        self.engine.close()  # with tensor parallelism: stops the followers
        self.sender.close()


class PrefillFollower:
    """Rank r > 0 of a tensor-parallel prefill worker: runs rank 0's steps, sends its KV heads."""

    def __init__(
        self,
        model_dir: str | Path,
        engine_config: EngineConfig,
        kv_backend: str,
        transfer_timeout_s: float,
        tp_rank: int,
        dist_init: str,
        on_released: Callable[[str], None],
        *,
        kv_secret: bytes,
    ):
        self.engine = LLMEngine(model_dir, engine_config, tp_rank=tp_rank, dist_init=dist_init)
        self.sender = KVSender(kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout, secret=kv_secret)
        self.transfer_timeout_s = transfer_timeout_s
        self.on_released = on_released
        self._thread = threading.Thread(
            target=self.engine.follow, args=(self._on_step,), name=f"prefill-rank-{tp_rank}", daemon=True
        )
        self._thread.start()

    def _on_step(self, starts: list[TransferStart] | None) -> Callable[[int], None] | None:
        if not starts:
            return None
        hook, _ = start_transfers(self.sender, starts, self.transfer_timeout_s, self.on_released)
        return hook

    def close(self) -> None:
        """After rank 0's close(): wait for the follow loop to end, then free everything."""
        self._thread.join()
        self.engine.close()
        self.sender.close()

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
the blocks come back through step 5. The worker keeps one record per request (_Prefill,
its state a PrefillState) from step 1 until the blocks are freed.

With tensor parallelism the worker is tp processes. Rank 0 (PrefillWorker) schedules;
the transfers that start in a step travel with it to the other ranks (PrefillFollower),
each of which starts its own part (its KV heads) of the same transfers and pushes its
layers. Rank 0 frees a request's blocks only once every rank's part has released them
(release_part). The followers report their releases over the ranks' control group: while
some part is out, rank 0 asks for reports at every step, and every SLOW_REPORT_POLL_S when
idle (a release only frees blocks: nobody waits for it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial
from pathlib import Path

from engine import EngineConfig, LLMEngine
from engine.engine_loop import SLOW_REPORT_POLL_S, EngineLoop, Turn
from engine.scheduler import SchedulerOutput
from kv_transfer import KVSender, Transfer
from proto.serving import FinishReason, GenerateRequest, KVHandle, PrefillResult, StepRecord, TokenDelta, WorkerStats


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
            s.request_id, s.block_ids, s.endpoints, timeout_s, on_release=partial(on_release, s.request_id)
        )
        for s in starts
    }
    request_ids = [s.request_id for s in starts]

    def push(layer_idx: int) -> None:
        for request_id in request_ids:
            sender.push_layer(request_id, layer_idx)

    return push, transfers


class PrefillState(StrEnum):
    """Where a request is on a prefill worker (its _Prefill record); the record goes once its
    blocks are freed."""

    QUEUED = "queued"  # in the engine, computing its prompt; no transfer yet
    STARTING = "starting"  # its final chunk is scheduled: the transfer is being started
    SENDING = "sending"  # every rank's part of the transfer started, and holds the blocks


@dataclass
class _Prefill:
    """The one record a prefill worker keeps per request, beside the engine's sequence."""

    handle: KVHandle  # where the KV goes
    state: PrefillState = PrefillState.QUEUED
    transfer: Transfer | None = None  # rank 0's part, once SENDING
    parts_left: int = 0  # ranks whose part still holds the blocks (STARTING and SENDING)
    own_part_out: bool = False  # rank 0's part holds the blocks
    aborted: bool = False  # cancel the transfer as soon as it exists


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
        engine: LLMEngine | None = None,
    ):
        """dist_init: with tensor_parallel_size > 1, the process group address all ranks join.
        kv_secret: the deployment's (kv_transfer/auth.py); KV goes only to decode workers holding it.
        engine: one already loaded to run on (a role change, elastic/role_actor.py), else one is built."""
        self.engine = engine or LLMEngine(model_dir, engine_config, rank=0, dist_init=dist_init)
        self.num_ranks = engine_config.num_ranks
        self.transfer_timeout_s = transfer_timeout_s
        self.sender = KVSender(kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout, secret=kv_secret)
        self._lock = threading.Lock()
        self._requests: dict[str, _Prefill] = {}  # from prefill() until the blocks are freed
        self.loop = EngineLoop(self.engine, turns=self)

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
            self._requests[request_id] = _Prefill(handle)
        try:
            self.loop.submit(request_id, list(request.prompt_token_ids), first_only, on_delta, hold_blocks=True)
        except BaseException:
            with self._lock:
                self._requests.pop(request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        with self._lock:
            record = self._requests.get(request_id)
            if record is not None:
                record.aborted = True
                if record.state is PrefillState.QUEUED:
                    del self._requests[request_id]
        self.loop.abort(request_id)
        if record is None:
            return  # unknown, or its blocks are freed already
        if record.state is PrefillState.QUEUED:
            self.loop.release_soon(request_id)  # nothing ever read the blocks
        elif record.transfer is not None:
            record.transfer.cancel("request aborted")  # blocks come back through release_part
        # STARTING: before_run cancels the transfer once it exists

    # ---- the loop's Turns ----------------------------------------------------------------

    def before_run(self, out: SchedulerOutput) -> Turn:
        """On the engine thread: start the transfers of prompts this step completes (every
        rank starts its part with the step), and hear the followers while their parts are out."""
        starts = []
        with self._lock:
            for item in out.scheduled:
                record = self._requests.get(item.seq.request_id) if item.samples else None
                if record is not None and record.state is PrefillState.QUEUED:
                    record.state, record.parts_left = PrefillState.STARTING, self.num_ranks
                    record.own_part_out = True
                    seq = item.seq
                    starts.append(TransferStart(seq.request_id, tuple(seq.block_ids), record.handle.endpoints))
            on_reports = self._on_reports if self._followers_hold_parts() else None
        if not starts:
            return Turn(on_reports=on_reports)
        hook, transfers = start_transfers(self.sender, starts, self.transfer_timeout_s, self._own_part_released)
        cancelled = []
        with self._lock:
            for request_id, transfer in transfers.items():
                record = self._requests.get(request_id)
                if record is None:  # every part released already (a transfer that failed at once)
                    continue
                record.state, record.transfer = PrefillState.SENDING, transfer
                if record.aborted:
                    cancelled.append(transfer)
        for transfer in cancelled:
            transfer.cancel("request aborted")  # blocks come back through release_part
        return Turn(hook, starts, self._on_reports if self.num_ranks > 1 else None)

    def _followers_hold_parts(self) -> bool:
        """Under the lock: some follower rank may still hold a part of a transfer."""
        return self.num_ranks > 1 and any(r.state is not PrefillState.QUEUED for r in self._requests.values())

    def idle_wait(self) -> float | None:
        with self._lock:
            return SLOW_REPORT_POLL_S if self._followers_hold_parts() else None

    def stopped(self, reason: BaseException) -> None:
        """The loop stopped (a lost rank, or close); every caller hears of it through its
        request's error delta. No follower reports any more, so their parts count as let go;
        rank 0's own parts are cancelled, and every block goes back as they end (the loop
        frees releases after it stopped)."""
        cancel: list[Transfer] = []
        free: list[str] = []
        with self._lock:
            for request_id, record in list(self._requests.items()):
                if record.state is not PrefillState.QUEUED and record.own_part_out and record.transfer is not None:
                    record.parts_left = 1
                    cancel.append(record.transfer)
                else:
                    del self._requests[request_id]
                    free.append(request_id)
        for request_id in free:
            self.loop.release_soon(request_id)
        for transfer in cancel:
            transfer.cancel(f"the engine loop stopped: {reason}")  # blocks come back through release_part

    def _on_reports(self, reports: list[object]) -> None:
        """Each follower's report: the requests whose part released the blocks there."""
        for released in reports:
            assert isinstance(released, list)
            for request_id in released:
                self.release_part(request_id)

    def _own_part_released(self, request_id: str) -> None:
        """Rank 0's part let go of the blocks (a KV transfer thread, or start() at once)."""
        with self._lock:
            record = self._requests.get(request_id)
            if record is not None:
                record.own_part_out = False
        self.release_part(request_id)

    def release_part(self, request_id: str) -> None:
        """One rank's part of a transfer let go of the blocks; the last one frees them."""
        with self._lock:
            record = self._requests.get(request_id)
            if record is None or record.parts_left <= 0:
                return
            record.parts_left -= 1
            if record.parts_left > 0:
                return
            del self._requests[request_id]
        self.loop.release_soon(request_id)

    def stats(self) -> WorkerStats:
        """Raises Unavailable once the engine broke: the router then stops picking this worker."""
        self.loop.check_running()
        with self._lock:
            num_transfers = sum(r.state is not PrefillState.QUEUED for r in self._requests.values())
        return self.loop.stats(num_transfers)

    def take_steps(self) -> list[StepRecord]:
        """The steps its engine ran since the last call (EngineLoop.take_steps)."""
        return self.loop.take_steps()

    def close(self, keep_engine: bool = False) -> None:
        """keep_engine: stop serving but leave the engine (its weights, cache) to another shell."""
        self.loop.close()
        if not keep_engine:
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
        rank: int,
        dist_init: str,
        *,
        kv_secret: bytes,
    ):
        self.engine = LLMEngine(model_dir, engine_config, rank=rank, dist_init=dist_init)
        self.sender = KVSender(kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout, secret=kv_secret)
        self.transfer_timeout_s = transfer_timeout_s
        self._lock = threading.Lock()
        self._released: list[str] = []  # parts that let go of their blocks, not reported yet
        self._thread = threading.Thread(
            target=self.engine.follow, args=(self._on_step, self._report), name=f"prefill-rank-{rank}", daemon=True
        )
        self._thread.start()

    def _on_step(self, starts: list[TransferStart] | None) -> Callable[[int], None] | None:
        if not starts:
            return None
        hook, _ = start_transfers(self.sender, starts, self.transfer_timeout_s, self._on_released)
        return hook

    def _on_released(self, request_id: str) -> None:  # a KV transfer thread
        with self._lock:
            self._released.append(request_id)

    def _report(self) -> list[str]:
        with self._lock:
            released, self._released = self._released, []
        return released

    def close(self) -> None:
        """After rank 0's close(): wait for the follow loop to end, then free everything."""
        self._thread.join()
        self.engine.close()
        self.sender.close()

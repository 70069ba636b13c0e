"""Disaggregated serving behind the Backend interface: the request's way, in one function.

    generate():
      1. tokenize and check the prompt; pick a decode worker (free KV blocks, batch load)
      2. short uncached prompt -> the decode worker prefills it itself (conditional
         disaggregation), else:
         a. decode.reserve(prompt)            -> KVHandle (blocks + KV endpoints)
         b. prefill.prefill(prompt, handle)   -> first token; KV pushed layer by layer
         c. decode.admit(first token)         -> waits for the KV, joins the running batch
      3. stream decode's deltas to the caller
      a cancel, disconnect or failure at any step -> abort on both workers (blocks freed)
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import AsyncIterator

from ray.exceptions import RayActorError, RayTaskError

from engine import SamplingParams
from engine.engine_loop import Overloaded, Unavailable, final_delta
from engine.tokenizer import load_tokenizer
from proto.serving import TokenDelta
from router.backend import STATS_INTERVAL_S, WorkerStatus
from router.policy import Router

log = logging.getLogger(__name__)
WORKER_STATS_TIMEOUT_S = 2.0


class DisaggregatedBackend:
    def __init__(self, model_dir: str | Path, prefill_actors: list, decode_actors: list, *, model_name: str,
                 max_model_len: int, block_size: int, kv_bytes_per_token: int,
                 policy: str = "load", local_prefill_tokens: int = 32):
        if not decode_actors:
            raise ValueError("at least one decode worker is needed")
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.kv_bytes_per_token = kv_bytes_per_token
        self.local_prefill_tokens = local_prefill_tokens
        self._tokenizer = load_tokenizer(model_dir)
        self.prefill_actors = prefill_actors
        self.decode_actors = decode_actors
        self.router = Router(policy, len(prefill_actors), len(decode_actors), block_size)
        self._stats_at = 0.0
        self.counters = {"kv_transfers_total": 0, "kv_transfer_failures_total": 0,
                         "kv_transfer_bytes_total": 0, "kv_transfer_seconds_total": 0.0,
                         "local_prefills_total": 0}

    @property
    def tokenizer(self):
        return self._tokenizer

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids to route by. The decode worker's engine validates them (empty, too long,
        out of vocabulary) and its ValueError reaches the caller unchanged."""
        if not isinstance(prompt, str):
            return list(prompt)
        if self._tokenizer is None:
            raise ValueError("this model has no tokenizer; send token ids")
        return self._tokenizer.encode(prompt)

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        token_ids = self.encode(prompt)
        await self._refresh_stats()
        hashes = self.router.hashes(token_ids)
        decode_view = self.router.pick_decode(hashes)  # Unavailable when no decode worker is up
        decode = self.decode_actors[decode_view.index]
        prefill = None
        transfer_start: float | None = None  # set while the first delta after a transfer is awaited
        finished = False  # the request ended on the workers: nothing left to abort
        try:
            uncached = len(token_ids) - decode_view.overlap_blocks(hashes) * self.router.block_size
            if not self.prefill_actors or uncached <= self.local_prefill_tokens:
                self.counters["local_prefills_total"] += 1
                stream = decode.generate_local.remote(request_id, token_ids, params)
            else:
                prefill_view = self.router.pick_prefill(hashes)
                prefill = self.prefill_actors[prefill_view.index]
                # Waits in the decode worker's queue until it has a batch slot and blocks.
                handle = await _unwrap(decode.reserve.remote(request_id, token_ids, params))
                result = await _unwrap(prefill.prefill.remote(request_id, token_ids, params, handle))
                prefill_view.remember(hashes)
                stream = decode.admit.remote(request_id, result.first_token_id)
                transfer_start = time.monotonic()
            decode_view.remember(hashes)
            async for ref in stream:
                delta = await _unwrap(ref)
                if transfer_start is not None:
                    self._count_transfer(len(token_ids), time.monotonic() - transfer_start)
                    transfer_start = None
                finished = delta.finished
                yield delta
        except (ValueError, Overloaded):
            raise  # the caller's fault or admission control: the frontends map these
        except (RayTaskError, RayActorError, Unavailable) as exc:
            # A worker failed or died: the request may succeed elsewhere (retryable). The
            # workers' health is looked at now, not at the next interval.
            if prefill is not None:
                self.counters["kv_transfer_failures_total"] += 1
            self._stats_at = 0.0
            yield final_delta(request_id, "error", _reason(exc), retryable=True)
        finally:
            if not finished:  # failed or cancelled anywhere: free what either worker holds
                decode.abort.remote(request_id)
                if prefill is not None:
                    prefill.abort.remote(request_id)

    def _count_transfer(self, num_tokens: int, seconds: float) -> None:
        self.counters["kv_transfers_total"] += 1
        self.counters["kv_transfer_bytes_total"] += num_tokens * self.kv_bytes_per_token
        self.counters["kv_transfer_seconds_total"] += seconds

    async def abort(self, request_id: str) -> None:
        for actor in self.prefill_actors + self.decode_actors:
            actor.abort.remote(request_id)

    async def _refresh_stats(self) -> None:
        if time.monotonic() - self._stats_at < STATS_INTERVAL_S:
            return
        self._stats_at = time.monotonic()
        views = self.router.prefill + self.router.decode
        actors = self.prefill_actors + self.decode_actors
        # A worker that does not answer within WORKER_STATS_TIMEOUT_S is as good as down.
        results = await asyncio.gather(*(asyncio.wait_for(a.stats.remote(), WORKER_STATS_TIMEOUT_S)
                                         for a in actors), return_exceptions=True)
        for view, result in zip(views, results):
            # A worker that does not answer (dead actor) or whose engine broke (its stats()
            # raises) is down: no stats are made up for it.
            view.alive = not isinstance(result, Exception)
            view.stats = result if view.alive else {}

    def is_ready(self) -> bool:
        """Every worker answered its last stats call (at most STATS_INTERVAL_S ago while served)."""
        return all(v.alive for v in self.router.prefill + self.router.decode)

    def workers(self) -> list[WorkerStatus]:
        return [WorkerStatus(role, v.index, v.alive, v.stats)
                for role, views in (("prefill", self.router.prefill), ("decode", self.router.decode))
                for v in views]

    def stats(self) -> dict[str, float]:
        """Sums over the workers that are up (prefill_* and decode_*), KV usage of the live
        decode pool, counters."""
        out: dict[str, float] = dict(self.counters)
        for role, views in (("prefill", self.router.prefill), ("decode", self.router.decode)):
            live = [v for v in views if v.alive]
            out[f"{role}_num_workers_up"] = len(live)
            for key in ("num_waiting", "num_running", "num_reserved", "num_held", "num_transfers",
                        "num_free_blocks", "num_blocks", "num_preemptions"):
                out[f"{role}_{key}"] = sum(v.stats.get(key, 0) for v in live)
        out["num_waiting"] = out["prefill_num_waiting"] + out["decode_num_waiting"]
        out["num_running"] = out["decode_num_running"]
        out["num_free_blocks"] = out["decode_num_free_blocks"]
        out["num_blocks"] = out["decode_num_blocks"]
        out["kv_usage"] = 1.0 - out["num_free_blocks"] / out["num_blocks"] if out["num_blocks"] else 0.0
        return out

    async def refresh(self) -> None:
        """Fetch every worker's stats now (tests and /metrics scrapes)."""
        self._stats_at = 0.0
        await self._refresh_stats()


async def _unwrap(ref):
    """Await a Ray result, re-raising a worker's ValueError, Overloaded or Unavailable as itself."""
    try:
        return await ref
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (ValueError, Overloaded, Unavailable)):
            raise cause from None
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RayActorError):
        return f"a worker died: {exc.__class__.__name__}"
    cause = getattr(exc, "cause", None)
    return f"{type(cause or exc).__name__}: {cause or exc}"


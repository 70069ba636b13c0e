"""The decode loop, testable without Ray.

A request's lifecycle on a decode worker:

 1. reserve(): blocks for the prompt are allocated and registered with the KV receiver,
    with a deadline; the caller gets a KVHandle to give the prefill worker;
 2. the KV arrives layer by layer (the receiver tracks it);
 3. admit(first_token): once the transfer is DONE the request joins the running batch
    with the prefill worker's first token; if it FAILED, the caller gets TransferFailed
    and the blocks come back through the receiver's on_release;
 4. it decodes in the continuous batch and streams deltas until it finishes.
Short prompts skip 1-3: generate_local() prefills here (conditional disaggregation).
An abort at any step frees everything the request holds, never blocks a sender may still write.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.engine_loop import EngineLoop
from kv_transfer import KVReceiver, Transfer, TransferState
from proto.serving import KVHandle, TokenDelta


class TransferFailed(RuntimeError):
    """The request's KV never arrived (deadline, lost prefill worker, cancel)."""


class DecodeWorker:
    def __init__(self, model_dir: str | Path, engine_config: EngineConfig, kv_backend: str,
                 host: str = "127.0.0.1", transfer_timeout_s: float = 30.0, max_waiting: int = 256):
        self.engine = LLMEngine(model_dir, engine_config)
        self.transfer_timeout_s = transfer_timeout_s
        self.receiver = KVReceiver(kv_backend, self.engine.kv_cache.tensor, self.engine.kv_cache.layout,
                                   host=host)
        self.loop = EngineLoop(self.engine, max_waiting=max_waiting)
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}  # reserved, not admitted yet

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVHandle:
        """Raises ValueError for a bad prompt, Overloaded when there is no room right now."""
        block_ids = self.loop.reserve(request_id, prompt_token_ids, params)
        transfer = self.receiver.expect(request_id, block_ids, self.transfer_timeout_s,
                                        on_release=lambda _ids: self.loop.release_soon(request_id))
        with self._lock:
            self._transfers[request_id] = transfer
        return KVHandle(request_id, (self.endpoint,), tuple(block_ids))

    def transfer_of(self, request_id: str) -> Transfer:
        with self._lock:
            return self._transfers[request_id]

    def admit(self, request_id: str, first_token_id: int, on_delta: Callable[[TokenDelta], None]) -> None:
        """Call once transfer_of(request_id) is DONE (wait on it first); starts streaming."""
        with self._lock:
            transfer = self._transfers.pop(request_id)
        if transfer.state is not TransferState.DONE:
            self.abort(request_id)
            raise TransferFailed(f"KV of {request_id} did not arrive: {transfer.error or transfer.state.value}")
        try:
            self.loop.admit(request_id, first_token_id, on_delta)
        except KeyError:  # aborted while we were admitting: the KV is here, nobody writes it
            self.loop.release_soon(request_id)
            raise TransferFailed(f"{request_id} was aborted before it was admitted") from None

    def generate_local(self, request_id: str, prompt: list[int], params: SamplingParams,
                       on_delta: Callable[[TokenDelta], None]) -> None:
        self.loop.submit(request_id, prompt, params, on_delta)

    def abort(self, request_id: str) -> None:
        with self._lock:
            transfer = self._transfers.pop(request_id, None)
        self.loop.abort(request_id)
        if transfer is None or transfer.state is TransferState.DONE:
            self.loop.release_soon(request_id)  # no sender can write these blocks any more
        else:
            transfer.cancel("request aborted")  # blocks come back through on_release

    def stats(self) -> dict[str, float]:
        with self._lock:
            num_transfers = len(self._transfers)
        return {**self.loop.stats(), "num_transfers": num_transfers}

    def close(self) -> None:
        self.loop.close()
        self.receiver.close()

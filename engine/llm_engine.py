"""The engine: one step is schedule, run, post-process.

Requests enter with add_request, advance one step() at a time, and leave finished or
aborted; every finished or aborted request has given its KV blocks back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import Detokenizer
from engine.kv_cache import TORCH_DTYPES, KVCache
from engine.loader import load_model, random_model
from engine.model_runner import ModelRunner
from engine.parallel import (
    GroupRunner,
    OnReports,
    OnStep,
    RankGroup,
    Report,
    check_tp_size,
    keep_layers,
    rank_device,
    shard_model,
    stage_bounds,
)
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import FinishReason, Sequence
from engine.tokenizer import load_tokenizer
from proto.kv import KVLayout
from proto.serving import Resume

CPU_KV_CACHE_BYTES = 1 << 30
GPU_MEMORY_FRACTION = 0.9


@dataclass
class RequestOutput:
    """What a request has produced so far. Built by the engine; the caller owns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated tokens so far
    new_token_ids: list[int]  # generated in the step that returned this output
    new_text: str  # text that became final in that step (empty without a tokenizer)
    text: str | None  # the whole decoded output once finished, else None
    finished: bool
    finish_reason: FinishReason | None  # once finished
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    # arrival_s, first_token_s (None before the first token), finished_s (once finished)
    metrics: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None  # why this request failed (finish_reason "error"), else None


@dataclass
class EngineRequest:
    seq: Sequence
    detokenizer: Detokenizer | None
    first_token_s: float | None = None
    error: str | None = None  # set when the request failed on its own (see run())


def num_kv_tokens(seq: Sequence) -> int:
    """The tokens whose KV a reserved request receives: its prompt, or for one migrated here
    every token but its newest (computed by its first step here)."""
    return len(seq) - 1 if seq.num_output_tokens else len(seq)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device='cpu'")
    return name


def resolve_dtype(name: str, model_config: ModelConfig, device: str) -> str:
    if name != "auto":
        return name
    return model_config.checkpoint_dtype if device.startswith("cuda") else "float32"


class LLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig = EngineConfig(),
        rank: int = 0,
        dist_init: str | None = None,
    ):
        """With config.num_ranks > 1 (tensor- and/or pipeline-parallel), every rank builds its
        engine in its own process with the same arguments but its rank (pp_rank *
        tensor_parallel_size + tp_rank), and dist_init (e.g. "tcp://host:port") names where
        the ranks meet; rank 0 is then used as usual and the others call follow() (see
        engine/parallel.py)."""
        self.config = config
        self.model_config = mc = ModelConfig.from_dir(model_dir)
        tp, pp, ranks = config.tensor_parallel_size, config.pipeline_parallel_size, config.num_ranks
        check_tp_size(mc, tp)
        bounds = stage_bounds(mc.num_layers, pp, config.pipeline_layers)
        if ranks > 1 and dist_init is None:
            raise ValueError(
                f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs dist_init, the address "
                f"where the ranks meet (e.g. 'tcp://127.0.0.1:29500')"
            )
        if not 0 <= rank < ranks:
            raise ValueError(f"rank must be in [0, tensor_parallel_size x pipeline_parallel_size={ranks}), got {rank}")
        pp_rank, tp_rank = divmod(rank, tp)
        self.device = resolve_device(config.device)
        if ranks > 1:
            self.device = rank_device(self.device, rank)
        self.dtype = resolve_dtype(config.dtype, mc, self.device)
        self.max_model_len = config.max_model_len or min(mc.max_position_embeddings, 4096)
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={mc.max_position_embeddings}"
            )
        self.group = RankGroup(rank, tp, pp, dist_init, self.device) if ranks > 1 else None
        if config.load_format == "dummy":
            if self.group is not None:
                raise ValueError("load_format 'dummy' is for one rank (tensor and pipeline parallel sizes 1)")
            self.model = random_model(mc, TORCH_DTYPES[self.dtype], self.device, self.max_model_len)
        elif self.group is None:
            self.model = load_model(model_dir, mc, TORCH_DTYPES[self.dtype], self.device, self.max_model_len)
        else:  # cut on the host, so that a GPU never holds more than its share
            self.model = load_model(model_dir, mc, TORCH_DTYPES[self.dtype], "cpu", self.max_model_len)
            keep_layers(self.model, bounds[pp_rank], bounds[pp_rank + 1])
            if tp > 1:
                shard_model(self.model, tp_rank, tp, self.group.tp)
            self.model = self.model.to(self.device)
        self.tokenizer = load_tokenizer(model_dir) if rank == 0 else None  # followers never tokenize
        layout = KVLayout(
            model_id=mc.model_id,
            num_layers=bounds[pp_rank + 1] - bounds[pp_rank],
            total_num_kv_heads=mc.num_kv_heads,
            num_kv_heads=mc.num_kv_heads // tp,
            head_dim=mc.head_dim,
            block_size=config.block_size,
            num_blocks=1,
            dtype=self.dtype,
            device=self.device,
            tp_rank=tp_rank,
            tp_size=tp,
            pp_rank=pp_rank,
            layer_bounds=bounds,
        )
        num_blocks = config.num_blocks or self._default_num_blocks(layout)
        if self.group is not None:  # rank 0's block ids must be valid on every rank
            num_blocks = self.group.min_over_ranks(num_blocks)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"num_blocks={num_blocks} x block_size={config.block_size} holds fewer tokens "
                f"than max_model_len={self.max_model_len}; raise num_blocks or kv_cache_bytes"
            )
        self.kv_cache = KVCache(replace(layout, num_blocks=num_blocks))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                eos_token_id=mc.eos_token_id,
            ),
            self.block_manager,
        )
        self.runner: ModelRunner
        if self.group is None:
            self.runner = ModelRunner(self.model, self.kv_cache)
        else:
            self.runner = GroupRunner(self.model, self.kv_cache, self.group, config.pipeline_microbatches)
        self.sampler = Sampler()
        self.requests: dict[str, EngineRequest] = {}

    def _default_num_blocks(self, layout: KVLayout) -> int:
        block_bytes = layout.bytes_per_token * layout.block_size
        budget = self.config.kv_cache_bytes
        if budget is None and self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            budget = int(free * GPU_MEMORY_FRACTION)
        budget = budget or CPU_KV_CACHE_BYTES
        wanted = self.config.max_num_seqs * -(-self.max_model_len // layout.block_size)
        return max(1, min(budget // block_bytes, wanted))

    # ---- requests -------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer; pass prompts as token ids")
            token_ids: list[int] = self.tokenizer.encode(prompt)
            return token_ids
        return list(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
        resume: Resume | None = None,
    ) -> None:
        """Queue a request. hold_blocks: keep its KV blocks after it finishes, until
        release() (a prefill worker sending the KV elsewhere). resume: what the request had
        generated on a worker that was lost; it is recomputed (as after a preemption) and
        the request goes on after it."""
        seq = self._new_sequence(request_id, prompt, params, hold_blocks)
        detokenizer = self._detokenizer(seq)
        if resume is not None:
            if hold_blocks:
                raise ValueError("resume: a resumed request is prefilled where it decodes, not sent elsewhere")
            self._resume(seq, detokenizer, resume)
        self.scheduler.add(seq)
        self.requests[seq.request_id] = EngineRequest(seq, detokenizer)

    def _resume(self, seq: Sequence, detokenizer: Detokenizer | None, resume: Resume) -> None:
        """ValueError (naming the field) when `resume` cannot continue this request."""
        if len(resume.token_ids) >= seq.params.max_tokens:
            raise ValueError(
                f"resume.token_ids holds {len(resume.token_ids)} tokens, max_tokens is {seq.params.max_tokens}: "
                f"the request had finished"
            )
        bad = [t for t in resume.token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            vocab = self.model_config.vocab_size
            raise ValueError(f"resume.token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        for token_id in resume.token_ids:
            seq.append_token(token_id)
            if self.scheduler.stop_reason(seq, token_id) is None:
                continue
            max_model_len = self.scheduler.config.max_model_len
            if len(seq) >= max_model_len:
                raise ValueError(
                    f"resume.token_ids: the prompt and {len(resume.token_ids)} tokens fill the context window "
                    f"(max_model_len={max_model_len})"
                )
            raise ValueError(f"resume.token_ids: token {token_id} had ended the request")
        if detokenizer is not None:
            detokenizer.resume(resume.token_ids, resume.text)

    def reserve(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, resume: Resume | None = None
    ) -> list[int]:
        """Decode side: allocate blocks for a prompt whose KV another worker computes.

        Returns the block ids to receive into; RuntimeError when the batch or the cache has
        no room now. The request waits until admit(); if it is aborted first, its blocks are
        held until release() (the KV may still be arriving). resume: a request migrated from
        another decode worker, with the tokens it generated there; the KV to receive is then
        that of the prompt and every generated token but the newest (num_kv_tokens()).
        """
        return self.reserve_blocks(self.new_reservation(request_id, prompt, params, resume))

    def new_reservation(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, resume: Resume | None = None
    ) -> EngineRequest:
        """First half of reserve(): the validated request (ValueError when it is bad), not
        tracked yet; reserve_blocks() gives it blocks once can_reserve() says there is room."""
        seq = self._new_sequence(request_id, prompt, params, hold_blocks=True)
        detokenizer = self._detokenizer(seq)
        if resume is not None:
            if not resume.token_ids:
                raise ValueError("resume.token_ids: a migrated request has generated at least one token")
            self._resume(seq, detokenizer, resume)
        self.scheduler.check_fits(seq)
        return EngineRequest(seq, detokenizer)

    def can_reserve(self, req: EngineRequest) -> bool:
        return self.scheduler.can_reserve(req.seq)

    def reserve_blocks(self, req: EngineRequest) -> list[int]:
        """Second half of reserve(): the ids of the blocks the KV goes to, in order (fewer than
        the request holds when the newest token of a migrated one starts a block);
        RuntimeError when there is no room."""
        seq = req.seq
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        block_ids = self.scheduler.reserve(seq)
        self.requests[seq.request_id] = req
        return block_ids[: self.block_manager.blocks_for(num_kv_tokens(seq))]

    def admit(self, request_id: str, first_token_id: int) -> RequestOutput | None:
        """Decode side: the reserved request's KV has arrived; decode from its first token.
        A migrated request streamed that token already: nothing to output (None)."""
        req = self.requests[request_id]
        migrated = req.seq.num_output_tokens > 0  # its newest token is computed next, streamed already
        self.scheduler.admit(request_id, first_token_id)
        return None if migrated else self._sampled(req, first_token_id, time.monotonic())

    def detach(self, request_id: str) -> Sequence:
        """Take a decoding request out of the batch, its blocks kept, to migrate it
        (Scheduler.detach; ValueError when it is not decoding here). abort() then leaves its
        blocks held until release(): a KV transfer may read them."""
        if request_id not in self.requests:
            raise ValueError(f"{request_id} cannot be detached: it is not running here")
        return self.scheduler.detach(request_id)

    def reattach(self, request_id: str) -> None:
        """A detached request goes on here, where it stopped (KeyError if not detached)."""
        self.scheduler.reattach(request_id)

    def release(self, request_id: str) -> None:
        """A KV transfer let go of a hold_blocks request's blocks: free them.

        A request that is still live then (its transfer failed before it finished: a
        prefill whose decode side vanished, a reservation whose KV never came) cannot go
        on, so it is aborted and its blocks freed at once.
        """
        req = self.requests.get(request_id)
        if req is not None:
            req.seq.hold_blocks = False
            self.abort(request_id)
        else:
            self.scheduler.release(request_id)

    def _new_sequence(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, hold_blocks: bool
    ) -> Sequence:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.encode(prompt)
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        bad = [t for t in token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.model_config.vocab_size})"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none")
        return Sequence(request_id, token_ids, params, arrival_s=time.monotonic(), hold_blocks=hold_blocks)

    def _detokenizer(self, seq: Sequence) -> Detokenizer | None:
        return Detokenizer(self.tokenizer, seq.params.stop) if self.tokenizer is not None else None

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; its blocks are freed at once. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req.seq, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- tensor and pipeline parallelism --------------------------------------------------

    @property
    def num_ranks(self) -> int:
        return self.config.num_ranks

    def follow(self, on_step: OnStep | None = None, report: Report | None = None) -> None:
        """Ranks > 0: run rank 0's turns until rank 0 calls close(). on_step(payload), if
        given, runs as each turn arrives and returns that step's per-layer hook (or None);
        report(), when rank 0 asks, returns what this rank tells it (run()'s on_reports)."""
        if self.group is None:
            raise RuntimeError("follow() is for ranks > 0 of a parallel engine; this one runs alone")
        assert isinstance(self.runner, GroupRunner)
        self.runner.follow(on_step, report)

    def close(self) -> None:
        """Leave the group of ranks; rank 0 first ends its followers' follow().
        Nothing to do for an engine that runs alone."""
        if self.group is None or self.group.closed:
            return
        try:
            if self.group.is_driver:
                assert isinstance(self.runner, GroupRunner)
                self.runner.stop_followers()
        except RuntimeError:  # a follower is gone already: there is no one left to stop
            pass
        finally:
            self.group.close()

    # ---- the step -------------------------------------------------------------------------

    def step(self, on_layer_stored: Callable[[int], None] | None = None) -> list[RequestOutput]:
        """Run one batch; return an output for every request that got a token or finished."""
        return self.run(self.schedule(), on_layer_stored)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. Split from run() so a prefill worker can start the KV
        transfers of the prompts this step completes before their layers compute."""
        return self.scheduler.schedule()

    def run(
        self,
        out: SchedulerOutput,
        on_layer_stored: Callable[[int], None] | None = None,
        step_payload: object = None,
        on_reports: OnReports | None = None,
    ) -> list[RequestOutput]:
        """With tensor parallelism: step_payload is picklable data that every follower's
        on_step receives with this step (e.g. the KV transfers that start in it), and
        on_reports, if given, gets the followers' reports (see follow()) before the forward.
        Both travel even when `out` has nothing to run."""
        if out.is_empty:
            if isinstance(self.runner, GroupRunner) and (step_payload is not None or on_reports is not None):
                self.runner.exchange(step_payload, on_reports)
            return []
        logits = self.runner.execute(out.scheduled, on_layer_stored, step_payload, on_reports)
        sampling = [s.seq for s in out.scheduled if s.samples]
        tokens, failures = self.sampler.sample(
            logits,
            [s.request_id for s in sampling],
            [s.params for s in sampling],
            [s.num_output_tokens for s in sampling],
        )
        sampled = {seq.request_id: tok for seq, tok in zip(sampling, tokens, strict=True) if tok is not None}
        self.scheduler.update(out, sampled)
        now = time.monotonic()
        outputs = [self._failed(self.requests[r], why, now) for r, why in failures.items() if r in self.requests]
        return outputs + [
            self._sampled(self.requests[item.seq.request_id], sampled[item.seq.request_id], now)
            for item in out.scheduled
            if item.seq.request_id in sampled
        ]

    def _sampled(self, req: EngineRequest, token_id: int, now: float) -> RequestOutput:
        """Post-process one request's new token: text, stop strings, output, clean-up."""
        seq = req.seq
        req.first_token_s = req.first_token_s or now
        try:
            if req.detokenizer is not None and req.detokenizer.append(token_id) and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)  # a stop string appeared
            output = self._output(req, [token_id], now)
        except Exception as exc:  # this request's text, not the batch: fail it alone
            return self._failed(req, f"post-processing token {token_id} failed: {exc!r}", now)
        if seq.is_finished:
            self._forget(seq.request_id)
        return output

    def _failed(self, req: EngineRequest, error: str, now: float) -> RequestOutput:
        """End one request with an error that is its own; the others in its batch go on."""
        req.error = error
        self.scheduler.finish(req.seq, FinishReason.ERROR)  # no-op when it had just finished otherwise
        req.seq.finish_reason = FinishReason.ERROR
        self._forget(req.seq.request_id)
        return self._output(req, [], now)

    def _forget(self, request_id: str) -> None:
        del self.requests[request_id]

    def _output(self, req: EngineRequest, new_token_ids: list[int], now: float) -> RequestOutput:
        seq = req.seq
        metrics: dict[str, float | None] = {"arrival_s": seq.arrival_s, "first_token_s": req.first_token_s}
        if seq.is_finished:
            metrics["finished_s"] = now
        detok = req.detokenizer if req.error is None else None
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=list(seq.output_token_ids),
            new_token_ids=new_token_ids,
            new_text=detok.delta(seq.is_finished) if detok else "",
            text=(detok.text if detok else None) if seq.is_finished else None,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            metrics=metrics,
            error=req.error,
        )

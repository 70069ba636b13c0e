"""Continuous batching with chunked prefill under a token budget.

A request's way through the scheduler::

    add() ──> WAITING ──schedule()──> RUNNING ──update()──> FINISHED ──> blocks freed
                 ^   takes prefix-cache hits,   │  each step: a prompt chunk (prefill)
                 │   allocates blocks for the   │  or the newest token (decode);
                 │   first chunk                │  blocks added as it grows
                 └────── preempted ─────────────┘  (out of blocks: blocks freed,
                         (front of the queue;       recomputed later from its tokens)
                          abort() at any point -> FINISHED)

Disaggregated serving adds two side doors. A prefill worker's request is added with
hold_blocks: when it finishes (after its first token) its blocks stay allocated, in
`held`, until release() once the KV transfer no longer reads them. A decode worker
reserve()s blocks for a prompt computed elsewhere (the request waits in `reserved` while
the KV arrives), then admit()s it with the first token: it joins the running batch as if
it had prefilled here. Reserved sequences count against max_num_seqs, so admission
never has to wait for room.

Live migration adds a third: a decoding sequence can be detach()ed (it leaves the batch
but keeps its blocks, in `detached`, while its KV is copied to another worker), then either
reattach()ed where it was (the copy failed) or finished (the copy landed). A reservation
may also carry tokens generated elsewhere (a migrated request): it is admitted with its
newest token already in place, to be computed by its first step here.

Each step has a budget of max_num_batched_tokens. Running sequences come first, in
arrival order (decodes take one token, unfinished prefills take a chunk of what is left);
waiting ones are admitted with what budget and batch slots remain. When a running
sequence needs a block and none is free, the most recently admitted running sequence is
preempted (possibly itself): its blocks are freed and it waits at the front of the queue.
Nothing is ever written to a block that another sequence still reads: shared prefix
blocks are full and only read, and a sequence writes only past its cached prefix.

The scheduler is pure Python; the planner's simulator drives it with a latency model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.block_manager import BlockManager
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in the running batch at most
    max_num_batched_tokens: int = 512  # tokens computed in one step at most (prefill chunk budget)
    max_model_len: int = 2048  # prompt plus generated tokens at most
    eos_token_id: int | tuple[int, ...] | None = None  # the model's end-of-sequence token(s)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        if self.eos_token_id is None:
            return frozenset()
        if isinstance(self.eos_token_id, int):
            return frozenset((self.eos_token_id,))
        return frozenset(self.eos_token_id)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed for seq in this step, from seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of seq's tokens, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)


class StepShape(NamedTuple):
    """What a step computes, in the terms of the planner's latency model
    (planner/latency/roofline.py, Coefficients.step_ms)."""

    prefill_tokens: int  # prompt tokens computed (whole prompts or chunks)
    attn_tokens2: int  # over the prompt chunks: new tokens x the tokens they attend to
    num_decodes: int  # sequences that compute one token after their outputs
    context_tokens: int  # the tokens those decodes attend to


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefills
    preempted: list[Sequence] = field(default_factory=list)  # lost their blocks this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def shape(self) -> StepShape:
        """What this step computes; read before the step runs (it advances the sequences)."""
        prefill_tokens = attn = num_decodes = context = 0
        for item in self.scheduled:
            seq, n = item.seq, item.num_new_tokens
            if n == 1 and seq.num_output_tokens > 0:
                num_decodes += 1
                context += seq.num_computed_tokens + 1
            else:
                prefill_tokens += n
                attn += n * (seq.num_computed_tokens + n)
        return StepShape(prefill_tokens, attn, num_decodes, context)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        capacity = block_manager.num_blocks * block_manager.block_size
        if capacity < config.max_model_len:
            # Otherwise a lone sequence could need more blocks than exist and wait forever.
            raise ValueError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len="
                f"{config.max_model_len}; add blocks or lower max_model_len"
            )
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved: dict[str, Sequence] = {}  # decode side: KV arriving from a prefill worker
        self.held: dict[str, Sequence] = {}  # prefill side: finished, KV still being sent
        self.detached: dict[str, Sequence] = {}  # out of the batch, blocks kept: being migrated
        self.num_preemptions_total = 0  # since start: a measure of KV memory pressure

    def check_fits(self, seq: Sequence) -> None:
        if len(seq) >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {len(seq)} tokens; the context window allows at most "
                f"{self.config.max_model_len - 1} (max_model_len={self.config.max_model_len})"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        """Requests this scheduler still steps (reserved ones wait for their KV instead)."""
        return len(self.waiting) + len(self.running)

    def reserve(self, seq: Sequence) -> list[int]:
        """Allocate blocks for seq's prompt, to be filled by a KV transfer. Returns the block ids.

        Raises RuntimeError when the batch or the cache has no room for it now.
        """
        self.check_fits(seq)
        if not self.can_reserve(seq):
            raise RuntimeError(
                f"no room for a {len(seq)}-token prompt: {len(self.running) + len(self.reserved)} "
                f"of {self.config.max_num_seqs} batch slots taken, "
                f"{self.block_manager.num_free_blocks} KV blocks free"
            )
        self.block_manager.allocate(seq, len(seq))
        seq.hold_blocks = True  # until admitted, only the KV receiver may give them back
        self.reserved[seq.request_id] = seq
        return list(seq.block_ids)

    def can_reserve(self, seq: Sequence) -> bool:
        """Whether reserve(seq) would find a batch slot and blocks now."""
        # One block more than the prompt needs, so the first decode step cannot be refused.
        return len(self.running) + len(self.reserved) < self.config.max_num_seqs and self.block_manager.can_allocate(
            seq, len(seq) + 1
        )

    def admit(self, request_id: str, first_token_id: int) -> Sequence:
        """Start decoding a reserved sequence whose KV has arrived, after its first token.

        A migrated sequence (outputs already in its tokens) has its newest token in place
        (first_token_id must be it) and KV for the ones before: its first step computes it."""
        seq = self.reserved[request_id]
        migrated = seq.num_output_tokens > 0
        if migrated and seq.token_ids[-1] != first_token_id:
            raise ValueError(
                f"{request_id}: first_token_id {first_token_id} is not its newest token {seq.token_ids[-1]}"
            )
        del self.reserved[request_id]
        seq.hold_blocks = False  # the KV is in place; the blocks are the request's now
        seq.num_computed_tokens = len(seq) - 1 if migrated else len(seq)
        self.block_manager.register_computed(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        if not migrated:
            seq.append_token(first_token_id)
            reason = self.stop_reason(seq, first_token_id)
            if reason is not None:
                self.finish(seq, reason)
        return seq

    def detach(self, request_id: str) -> Sequence:
        """Take a decoding sequence out of the batch, keeping its blocks (hold_blocks: an abort
        now leaves them in `held` until release()), so that its KV can be copied elsewhere.
        ValueError unless it is running and decoding (all but its newest token computed)."""
        seq = next((s for s in self.running if s.request_id == request_id), None)
        if seq is None or seq.num_output_tokens == 0 or seq.num_computed_tokens != len(seq) - 1:
            where = "not running here" if seq is None else "not decoding yet"
            raise ValueError(f"{request_id} cannot be detached: it is {where}")
        self.running.remove(seq)
        seq.hold_blocks = True
        self.detached[request_id] = seq
        return seq

    def reattach(self, request_id: str) -> Sequence:
        """Put a detached sequence back into the batch, as it was (KeyError if not detached)."""
        seq = self.detached.pop(request_id)
        seq.hold_blocks = False
        self.running.append(seq)
        return seq

    def release(self, request_id: str) -> None:
        """Free a finished hold_blocks sequence's blocks, once no KV transfer touches them."""
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences: decodes and unfinished prefill chunks, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_allocate(seq, num_new) and self.running[-1] is not seq:
                out.preempted.append(self._preempt(self.running.pop()))
            if not bm.can_allocate(seq, num_new):
                self.running.pop(i)
                out.preempted.append(self._preempt(seq))
                continue
            bm.allocate(seq, num_new)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1

        # 2. Waiting sequences, while budget, batch slots and blocks last (not after a
        #    preemption: blocks are short, so let the running ones finish first).
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached_ids = bm.find_cached_blocks(seq.token_ids)
            num_new = min(len(seq) - len(cached_ids) * bm.block_size, budget)
            if not bm.can_allocate(seq, num_new, cached_ids):
                break
            self.waiting.popleft()
            bm.take_cached(seq, cached_ids)
            if seq.num_preemptions == 0:  # a resumed request's outputs may be cached too
                seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            bm.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        out.scheduled.sort(key=lambda s: s.num_new_tokens > 1 or not s.samples)
        return out

    def _preempt(self, seq: Sequence) -> Sequence:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        return seq

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Record a finished step: advance computed counts, append sampled tokens, finish.

        sampled maps request ids to the token sampled for each sequence whose step reached
        the end of its tokens (ScheduledSeq.samples). Returns the sequences finished now.
        """
        finished = []
        for item in out.scheduled:
            seq = item.seq
            if seq.is_finished:  # aborted while its step ran
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.register_computed(seq)
            if seq.request_id not in sampled:
                continue
            token_id = sampled[seq.request_id]
            seq.append_token(token_id)
            reason = self.stop_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token_id in self.config.eos_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or len(seq) >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End seq now (stop string, abort, or a stop condition) and give back its blocks."""
        if seq.is_finished:
            return
        if seq.request_id in self.reserved:
            del self.reserved[seq.request_id]
        elif seq.request_id in self.detached:
            del self.detached[seq.request_id]
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if seq.hold_blocks:  # a transfer may still touch them: the owner releases them later
            self.held[seq.request_id] = seq
        else:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

"""One simulated prefill or decode instance: the engine's real Scheduler and BlockManager,
with the latency model in place of the GPU.

An instance of pp pipeline stages runs as the engine does: one scheduler over all the KV
blocks, one step at a time; the stages overlap only inside a step, on its micro-batches,
which the latency model's step time includes (planner/latency/roofline.py).

Disaggregation uses the scheduler's own side doors: decode reserve()s a prompt's blocks
and batch slot before prefill runs (the request waits while there is no room), prefill
holds a finished prompt's blocks until the transfer release()s them, and decode admit()s
the sequence with its first token once the KV has arrived.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence
from planner.solve.capacity import InstanceOption


def step_ms(option: InstanceOption, out: SchedulerOutput) -> float:
    """Latency of one scheduled step: decodes (one new token after outputs) and prompt chunks."""
    return option.coefficients.step_ms(*out.shape())


class SimInstance:
    def __init__(self, index: int, node: str, option: InstanceOption, block_size: int, max_model_len: int):
        self.index = index
        self.node = node
        self.option = option
        num_blocks = option.kv_tokens // block_size
        config = SchedulerConfig(
            max_num_seqs=option.max_batch_size,
            max_num_batched_tokens=option.max_batched_tokens,
            max_model_len=max_model_len,
        )
        # Prefix caching stays off: simulated prompts have no shared content to hit.
        self.scheduler = Scheduler(config, BlockManager(num_blocks, block_size, enable_prefix_caching=False))
        self.busy = False  # a step is running
        self.reserve_queue: deque = deque()  # decode: requests waiting for blocks and a batch slot
        self.num_assigned = 0  # requests routed here and not finished (router load signal)
        self.pending_tokens = 0  # prompt tokens queued or running here (prefill load signal)

    @property
    def role(self) -> str:
        return self.option.role

    def add_prefill(self, seq: Sequence) -> None:
        """Prefill: queue seq; its blocks are held after it finishes, until release(), as the
        KV transfer reads them."""
        seq.hold_blocks = True
        self.scheduler.add(seq)

    def release(self, request_id: str) -> None:
        self.scheduler.release(request_id)

    def try_reserve(self, seq: Sequence) -> bool:
        """Decode: reserve blocks and a batch slot for seq's prompt; False when there is no
        room now."""
        try:
            self.scheduler.reserve(seq)
        except RuntimeError:  # no batch slot or blocks now
            return False
        return True

    def admit(self, request_id: str) -> Sequence:
        """Decode: the KV has arrived; decode from the first token (which prefill sampled)."""
        return self.scheduler.admit(request_id, first_token_id=1)

    def start_step(self) -> tuple[SchedulerOutput, float] | None:
        """Schedule the next batch if no step runs. Returns the batch and its duration in
        seconds, or None when nothing runs."""
        if self.busy:
            return None
        out = self.scheduler.schedule()
        if out.is_empty:
            return None
        self.busy = True
        return out, step_ms(self.option, out) / 1e3

    def finish_step(self, out: SchedulerOutput) -> list[Sequence]:
        """Record the step's sampled tokens; returns the sequences finished by it."""
        self.busy = False
        sampled = {item.seq.request_id: 1 for item in out.scheduled if item.samples}
        return self.scheduler.update(out, sampled)

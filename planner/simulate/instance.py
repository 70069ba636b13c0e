"""One simulated prefill or decode instance: the engine's real Scheduler and BlockManager,
with the latency model in place of the GPU.

An instance of pp pipeline stages runs pp schedulers ("virtual engines", as vLLM runs
pipeline parallelism): each one's batch takes the whole pipeline's latency, and a new
batch may enter the first stage once the previous batch has left it (latency / pp later).
Each scheduler owns 1/pp of the instance's KV blocks.

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
        num_blocks = option.kv_tokens // option.pp // block_size
        config = SchedulerConfig(
            max_num_seqs=option.max_batch_size,
            max_num_batched_tokens=option.max_batched_tokens,
            max_model_len=max_model_len,
        )
        # Prefix caching stays off: simulated prompts have no shared content to hit.
        self.engines = [
            Scheduler(config, BlockManager(num_blocks, block_size, enable_prefix_caching=False))
            for _ in range(option.pp)
        ]
        self.busy = [False] * option.pp
        self.reserve_queue: deque = deque()  # decode: requests waiting for blocks and a batch slot
        self.entry_free_s = 0.0  # when the first pipeline stage takes the next batch
        self.num_assigned = 0  # requests routed here and not finished (router load signal)
        self.pending_tokens = 0  # prompt tokens queued or running here (prefill load signal)

    @property
    def role(self) -> str:
        return self.option.role

    def add_prefill(self, seq: Sequence) -> int:
        """Prefill: queue seq on the least loaded engine; its blocks are held after it
        finishes, until release(), as the KV transfer reads them."""
        engine = min(range(len(self.engines)), key=lambda e: self.engines[e].num_unfinished)
        seq.hold_blocks = True
        self.engines[engine].add(seq)
        return engine

    def release(self, engine: int, request_id: str) -> None:
        self.engines[engine].release(request_id)

    def try_reserve(self, seq: Sequence) -> int | None:
        """Decode: reserve blocks and a batch slot for seq's prompt on the engine with the
        most free blocks; None when no engine has room now."""
        by_free = sorted(range(len(self.engines)), key=lambda e: -self.engines[e].block_manager.num_free_blocks)
        for engine in by_free:
            try:
                self.engines[engine].reserve(seq)
                return engine
            except RuntimeError:  # no batch slot or blocks on this engine now
                continue
        return None

    def admit(self, engine: int, request_id: str) -> Sequence:
        """Decode: the KV has arrived; decode from the first token (which prefill sampled)."""
        return self.engines[engine].admit(request_id, first_token_id=1)

    def start_step(self, engine: int, now_s: float) -> tuple[SchedulerOutput, float] | None:
        """Schedule the engine's next batch if it is idle and the pipeline takes one now.

        Returns the batch and its duration in seconds, or None when nothing runs.
        """
        if self.busy[engine] or now_s < self.entry_free_s:
            return None
        out = self.engines[engine].schedule()
        if out.is_empty:
            return None
        duration_s = step_ms(self.option, out) / 1e3
        self.busy[engine] = True
        self.entry_free_s = now_s + duration_s / self.option.pp
        return out, duration_s

    def finish_step(self, engine: int, out: SchedulerOutput) -> list[Sequence]:
        """Record the step's sampled tokens; returns the sequences finished by it."""
        self.busy[engine] = False
        sampled = {item.seq.request_id: 1 for item in out.scheduled if item.samples}
        return self.engines[engine].update(out, sampled)

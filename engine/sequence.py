"""One request's state inside an engine: its tokens, its blocks and how far it has run."""

from __future__ import annotations

import enum

from engine.sampling_params import SamplingParams
from proto.serving import FinishReason

__all__ = ["FinishReason", "Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds blocks; is prefilling in chunks or decoding
    FINISHED = "finished"  # done; its blocks have been given back


class Sequence:
    """A request as the scheduler and block manager see it.

    token_ids holds the prompt followed by everything generated so far. num_computed_tokens
    counts the leading tokens whose K/V are in the cache; the gap to len(token_ids) is
    what the next steps must compute (a prompt chunk, or the one newest token).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_s: float = 0.0,
        hold_blocks: bool = False,
    ):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_s = arrival_s
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_cached_prompt_tokens = 0  # prompt tokens served by the prefix cache
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        # On finishing, keep the blocks (in Scheduler.held) until release(): a KV transfer
        # may still read them (prefill side) or write them (decode side, before admit).
        self.hold_blocks = hold_blocks

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.value}, len={len(self)}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )

"""Turns one scheduler step into tensors, runs the model, returns the logits to sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillSpan
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler import ScheduledSeq


@dataclass(frozen=True)
class StepInputs:
    """One step's flattened batch as plain lists: decodes first, then prompt chunks.

    Built by plan() on the rank that schedules; plain data so that it can be broadcast to
    the other tensor-parallel ranks, each of which turns it into tensors on its own device.
    """

    input_ids: list[int]  # [num_tokens]
    positions: list[int]  # [num_tokens]
    slot_mapping: list[int]  # [num_tokens]: block_id * block_size + offset
    decode_block_tables: list[list[int]]  # [num_decodes][blocks of that sequence]
    decode_context_lens: list[int]  # [num_decodes]: tokens in cache incl. the new one
    prefill_spans: list[tuple[int, int, int]]  # per chunk: (query_start, num_tokens, start_pos)
    prefill_block_tables: list[list[int]]  # per chunk: the block ids of its sequence
    sample_indices: list[int]  # rows of the batch whose next token is sampled, in step order


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.layout.block_size
        self.device = torch.device(kv_cache.layout.device)

    def plan(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        """Flatten the step: decodes first (one token each), then prompt chunks."""
        bs = self.block_size
        step = StepInputs([], [], [], [], [], [], [], [])
        for item in scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            query_start = len(step.input_ids)
            step.input_ids.extend(seq.token_ids[start : start + n])
            step.positions.extend(range(start, start + n))
            blocks = seq.block_ids
            step.slot_mapping.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1 and item.samples:
                assert not step.prefill_spans, "decodes must precede prefill chunks in a step"
                step.decode_block_tables.append(list(blocks))
                step.decode_context_lens.append(start + 1)
            else:
                step.prefill_spans.append((query_start, n, start))
                step.prefill_block_tables.append(list(blocks))
            if item.samples:
                step.sample_indices.append(len(step.input_ids) - 1)
        return step

    def tensors(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """The model's inputs on this runner's device: ids, positions, metadata, sample rows."""
        dev = self.device
        max_blocks = max((len(t) for t in step.decode_block_tables), default=0)
        table = torch.zeros((len(step.decode_block_tables), max_blocks), dtype=torch.int32)
        for row, blocks in enumerate(step.decode_block_tables):
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slot_mapping, dtype=torch.int64, device=dev),
            num_decode_tokens=len(step.decode_block_tables),
            decode_block_tables=table.to(dev),
            decode_context_lens=torch.tensor(step.decode_context_lens, dtype=torch.int32, device=dev),
            prefills=[
                PrefillSpan(*span, torch.tensor(blocks, device=dev))
                for span, blocks in zip(step.prefill_spans, step.prefill_block_tables, strict=True)
            ],
        )
        ids = torch.tensor(step.input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(step.positions, dtype=torch.int64, device=dev)
        return ids, pos, meta, torch.tensor(step.sample_indices, dtype=torch.int64, device=dev)

    def prepare(
        self, scheduled: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        return self.tensors(self.plan(scheduled))

    @torch.inference_mode()
    def forward(self, step: StepInputs, on_layer_stored: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the model over one step (K/V go to the cache); returns the hidden states of
        the sampled rows, [num_sampling_seqs, hidden_size]."""
        ids, pos, meta, sample_indices = self.tensors(step)
        hidden: torch.Tensor = self.model(ids, pos, meta, self.kv_cache, on_layer_stored)
        return hidden[sample_indices]

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSeq],
        on_layer_stored: Callable[[int], None] | None = None,
        step_payload: object = None,
        on_reports: Callable[[list[object]], None] | None = None,
    ) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling_seqs, vocab] in step order.

        step_payload and on_reports are for tensor-parallel followers (TPModelRunner); alone,
        there are none."""
        return self.model.compute_logits(self.forward(self.plan(scheduled), on_layer_stored))

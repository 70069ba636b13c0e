"""Turns one scheduler step into tensors, runs the model, returns the logits to sample."""

from __future__ import annotations

from typing import Callable

import torch

from engine.attention import AttentionMetadata, PrefillSpan
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.layout.block_size
        self.device = torch.device(kv_cache.layout.device)

    def prepare(self, scheduled: list[ScheduledSeq]):
        """Flatten the step: decodes first (one token each), then prompt chunks."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        sample_indices: list[int] = []
        for item in scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            query_start = len(input_ids)
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1 and item.samples:
                assert not prefills, "decodes must precede prefill chunks in a step"
                dec_tables.append(blocks)
                dec_lens.append(start + 1)
            else:
                prefills.append(PrefillSpan(query_start, n, start, torch.tensor(blocks, device=self.device)))
            if item.samples:
                sample_indices.append(len(input_ids) - 1)
        max_blocks = max((len(t) for t in dec_tables), default=0)
        table = torch.zeros((len(dec_tables), max_blocks), dtype=torch.int32)
        for row, blocks in enumerate(dec_tables):
            table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            num_decode_tokens=len(dec_tables),
            decode_block_tables=table.to(self.device),
            decode_context_lens=torch.tensor(dec_lens, dtype=torch.int32, device=self.device),
            prefills=prefills,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return ids, pos, meta, torch.tensor(sample_indices, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq],
                on_layer_stored: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling_seqs, vocab] in step order."""
        ids, pos, meta, sample_indices = self.prepare(scheduled)
        hidden = self.model(ids, pos, meta, self.kv_cache, on_layer_stored)
        return self.model.compute_logits(hidden[sample_indices])

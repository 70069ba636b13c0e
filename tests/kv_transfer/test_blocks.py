"""Chunk addressing and the CPU chunk copy, checked against torch indexing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_transfer.blocks import all_chunk_offsets, check_block_ids, chunk_offsets, coalesce, copy_chunks, layer_chunk_ids
from tests.kv_transfer.peer import make_layout


def test_chunk_offsets_point_at_the_tensor_elements():
    layout = make_layout(dtype="float16")
    cache = torch.empty(layout.shape, dtype=torch.float16)
    ids = np.array([5, 0, 23])
    for layer in range(layout.num_layers):
        offsets = chunk_offsets(layout, layer_chunk_ids(layout, layer, ids), head_start=2)
        want = [cache[layer, kv, b, 2].data_ptr() - cache.data_ptr() for kv in (0, 1) for b in ids]
        assert offsets.tolist() == want
    every = all_chunk_offsets(layout, head_start=1)
    assert (
        every[layer_chunk_ids(layout, 3, ids)].tolist()
        == chunk_offsets(layout, layer_chunk_ids(layout, 3, ids), 1).tolist()
    )


def test_coalesce_merges_runs_adjacent_on_both_sides():
    src = np.array([0, 10, 20, 50, 60])
    dst = np.array([100, 110, 200, 210, 220])
    assert [a.tolist() for a in coalesce(src, dst, 10)] == [[0, 20, 50], [100, 200, 210], [20, 10, 20]]


def test_copy_chunks_equals_indexed_copy():
    layout = make_layout(dtype="bfloat16")
    src = torch.randn(layout.shape).to(torch.bfloat16)
    dst = torch.zeros_like(src)
    src_ids, dst_ids = np.array([1, 2, 3, 9, 4]), np.array([7, 8, 9, 0, 23])
    heads = 2  # copy heads 1-2 of the source into heads 2-3 of the destination
    for layer in range(layout.num_layers):
        s = chunk_offsets(layout, layer_chunk_ids(layout, layer, src_ids), 1)
        d = chunk_offsets(layout, layer_chunk_ids(layout, layer, dst_ids), 2)
        s, d, n = coalesce(s, d, heads * layout.bytes_per_head_block)
        copy_chunks(dst.data_ptr(), d, src.data_ptr(), s, n)
    want = torch.zeros_like(src)
    want[:, :, dst_ids, 2:4] = src[:, :, src_ids, 1:3]
    assert torch.equal(dst.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize(
    "ids, message",
    [([], "must not be empty"), ([0, 24], r"\[0, 24\)"), ([-1], r"\[0, 24\)"), ([3, 3], "must not repeat")],
)
def test_bad_block_ids_are_rejected_before_any_byte_moves(ids, message):
    with pytest.raises(ValueError, match=message):
        check_block_ids(ids, 24, "dst_block_ids")

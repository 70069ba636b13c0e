"""The TP head mapping, as a pure function: every head goes to exactly the rank that owns it."""

from __future__ import annotations

import pytest

from kv_transfer.resharding import HeadSlice, dst_ranks_of, head_slice, head_slices, src_ranks_of


def test_prefill_tp2_to_decode_tp1():
    assert head_slices(8, 2, 1) == (HeadSlice(0, 0, 0, 0, 4), HeadSlice(1, 0, 0, 4, 4))


def test_prefill_tp1_to_decode_tp2():
    assert head_slices(8, 1, 2) == (HeadSlice(0, 0, 0, 0, 4), HeadSlice(0, 1, 4, 0, 4))


def test_equal_tp_sizes_map_rank_to_rank():
    assert head_slices(8, 4, 4) == tuple(HeadSlice(r, r, 0, 0, 2) for r in range(4))


@pytest.mark.parametrize(
    "total, src_tp, dst_tp",
    [
        (8, 2, 1),
        (8, 1, 2),
        (8, 2, 4),
        (8, 4, 2),
        (8, 8, 1),
        (8, 1, 8),
        (12, 3, 2),
        (12, 2, 3),
        (12, 4, 6),
        (32, 8, 2),
        (1, 1, 1),
    ],
)
def test_every_head_moves_once_to_its_owner(total, src_tp, dst_tp):
    src_heads, dst_heads = total // src_tp, total // dst_tp
    moved = []  # (global head, src rank, dst rank)
    for s in head_slices(total, src_tp, dst_tp):
        assert s.num_heads > 0
        assert 0 <= s.src_head_start and s.src_head_start + s.num_heads <= src_heads
        assert 0 <= s.dst_head_start and s.dst_head_start + s.num_heads <= dst_heads
        for i in range(s.num_heads):
            head = s.src_rank * src_heads + s.src_head_start + i
            assert head == s.dst_rank * dst_heads + s.dst_head_start + i
            moved.append((head, s.src_rank, s.dst_rank))
    assert sorted(h for h, _, _ in moved) == list(range(total))
    for head, src_rank, dst_rank in moved:
        assert (src_rank, dst_rank) == (head // src_heads, head // dst_heads)


def test_ranks_without_shared_heads_get_none():
    assert head_slice(8, 0, 4, 1, 2) is None  # prefill rank 0 holds heads 0-1, decode rank 1 4-7


@pytest.mark.parametrize(
    "args, message",
    [
        ((8, 0, 3, 0, 1), "src_tp_size must be a positive divisor of total_num_kv_heads=8, got 3"),
        ((8, 0, 1, 0, 0), "dst_tp_size must be a positive divisor"),
        ((8, 2, 2, 0, 1), "ranks must lie in their TP groups"),
    ],
)
def test_invalid_groups_are_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        head_slice(*args)


def test_who_talks_to_whom():
    # 8 heads, prefill TP=2 (4 heads each), decode TP=4 (2 heads each).
    assert [dst_ranks_of(8, s, 2, 4) for s in range(2)] == [(0, 1), (2, 3)]
    assert [src_ranks_of(8, r, 4, 2) for r in range(4)] == [(0,), (0,), (1,), (1,)]
    assert src_ranks_of(8, 0, 1, 2) == (0, 1) and dst_ranks_of(8, 1, 2, 1) == (0,)

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4


def seq(rid, tokens):
    return Sequence(rid, tokens, SamplingParams(max_tokens=4))


def admit(bm, s):
    """Take prefix hits and allocate the rest of s's tokens, as the scheduler does."""
    hits = bm.find_cached_blocks(s.token_ids)
    assert bm.can_allocate(s, len(s) - len(hits) * BS, hits)
    bm.take_cached(s, hits)
    bm.allocate(s, len(s) - s.num_computed_tokens)
    s.num_computed_tokens = len(s)
    bm.register_computed(s)
    return hits


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq("a", list(range(10)))
    admit(bm, a)
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 5
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 8


def test_prefix_reuse_shares_full_blocks_with_reference_counts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq("a", list(range(10)))
    admit(bm, a)
    b = seq("b", list(range(8)) + [99, 98, 97])
    hits = admit(bm, b)
    assert hits == a.block_ids[:2]  # two full shared blocks; the partial third is not shared
    assert b.num_cached_prompt_tokens == 0 and b.block_ids[:2] == a.block_ids[:2]
    assert [bm.ref_counts[i] for i in hits] == [2, 2]
    bm.free(a)
    assert [bm.ref_counts[i] for i in hits] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = seq("a", list(range(9)))
    admit(bm, a)
    ids = list(a.block_ids)
    bm.free(a)
    again = seq("a2", list(range(9)))
    assert bm.find_cached_blocks(again.token_ids) == ids[:2]
    # Allocating everything evicts the cached blocks: their hashes must be forgotten.
    filler = seq("f", [50 + i for i in range(16)])
    admit(bm, filler)
    assert bm.find_cached_blocks(again.token_ids) == []


def test_fully_cached_prompt_leaves_its_last_block_to_compute():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq("a", list(range(8)))
    admit(bm, a)
    assert bm.find_cached_blocks(list(range(8))) == a.block_ids[:1]


def test_different_prefix_same_block_contents_do_not_hit():
    bm = BlockManager(num_blocks=8, block_size=BS)
    admit(bm, seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Second block's tokens equal a's second block, but the chain differs: no hit.
    assert bm.find_cached_blocks([0, 0, 0, 0, 5, 6, 7, 8, 9]) == []


def test_out_of_blocks_is_refused_not_corrupted():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = seq("a", list(range(12)))
    assert not bm.can_allocate(a, 12)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(a, 12)
    assert bm.num_free_blocks == 2 and a.block_ids == []


def test_revived_cached_blocks_count_against_free_space():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = seq("a", list(range(8)))
    admit(bm, a)
    bm.free(a)  # both blocks free but cached
    b = seq("b", list(range(8)) + list(range(100, 108)))
    hits = bm.find_cached_blocks(b.token_ids)
    assert len(hits) == 2
    # b needs 4 blocks: 2 revived from the free list + 2 new; only 3 exist.
    assert not bm.can_allocate(b, len(b) - 8, hits)

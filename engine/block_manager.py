"""Block manager: which physical KV blocks each sequence owns, with prefix caching.

Blocks are reference counted. A full block is identified by a chained hash of its tokens
and the hash of the block before it, so equal hashes mean equal prefixes. A freed block
keeps its hash and contents until it is handed out again, so a later request with the same
prefix can take it back (the free list is kept least-recently-freed first, and the tail
blocks of a sequence are freed first, so shared prefixes are evicted last).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Collection

from engine.sequence import Sequence


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Chained hash of one full block: equal only for equal token prefixes (128-bit)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """Chained hashes of every full block of token_ids, in order (the prefix cache's keys)."""
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


class BlockManager:
    """Hands out and takes back KV blocks for sequences; owns the prefix cache index."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id holding that prefix block
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # per sequence: hashes of its leading full blocks (the chain continues from the last)
        self.seq_hashes: dict[str, list[bytes]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookups -------------------------------------------------------------

    def find_cached_blocks(self, token_ids: list[int]) -> list[int]:
        """Block ids that already hold the longest cached prefix of token_ids (full blocks).

        At least one token is always left to compute (the model needs it for the next
        token's logits), so a fully cached sequence gets all but its last block.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for h in prefix_block_hashes(token_ids, self.block_size):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        if hits and len(hits) * self.block_size >= len(token_ids):
            hits.pop()
        return hits

    # ---- allocation -----------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_ids: Collection[int] = ()) -> bool:
        """Whether seq can grow to cover num_new_tokens more tokens (after taking cached_ids)."""
        have = len(seq.block_ids) + len(cached_ids)
        num_needed = (
            self.blocks_for(seq.num_computed_tokens + len(cached_ids) * self.block_size + num_new_tokens) - have
        )
        num_revived = sum(1 for b in cached_ids if self.ref_counts[b] == 0)
        return num_needed <= self.num_free_blocks - num_revived

    def take_cached(self, seq: Sequence, cached_ids: list[int]) -> None:
        """Give a new sequence the prefix blocks found by find_cached_blocks."""
        assert not seq.block_ids and seq.num_computed_tokens == 0, "only a fresh sequence takes a prefix"
        hashes = []
        for block_id in cached_ids:
            h = self.block_hash[block_id]
            assert h is not None, "a cached block keeps its hash"
            hashes.append(h)
            if self.ref_counts[block_id] == 0:
                del self.free_ids[block_id]
            self.ref_counts[block_id] += 1
        seq.block_ids = list(cached_ids)
        seq.num_computed_tokens = len(cached_ids) * self.block_size
        self.seq_hashes[seq.request_id] = hashes

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Add blocks so that seq covers num_computed_tokens + num_new_tokens slots."""
        num_needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if num_needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {num_needed}, {self.num_free_blocks} free")
        for _ in range(num_needed):
            block_id, _ = self.free_ids.popitem(last=False)
            old_hash = self.block_hash[block_id]
            if old_hash is not None and self.cached.get(old_hash) == block_id:
                del self.cached[old_hash]  # evicted: its contents are about to be overwritten
            self.block_hash[block_id] = None
            self.ref_counts[block_id] = 1
            seq.block_ids.append(block_id)
        self.seq_hashes.setdefault(seq.request_id, [])

    def free(self, seq: Sequence) -> None:
        """Take back all of seq's blocks; cached ones stay findable until reused."""
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_ids[block_id] = None
        seq.block_ids = []
        self.seq_hashes.pop(seq.request_id, None)

    def register_computed(self, seq: Sequence) -> None:
        """Index seq's blocks that became full and computed, so later prefixes can hit them.

        Called after the step that wrote their K/V, never before: a block is findable only
        once its contents are final.
        """
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_hashes.setdefault(seq.request_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            h = hash_block(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            hashes.append(h)
            block_id = seq.block_ids[i]
            if h not in self.cached:
                self.cached[h] = block_id
                self.block_hash[block_id] = h

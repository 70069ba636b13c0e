"""Where the chunks of a block live in a cache, and moving lists of chunks on the CPU.

A chunk is one run of heads of one (layer, K|V, block): contiguous in the HND layout
(proto/kv.py). Chunks are numbered layer-major, K before V::

    chunk id      = (local layer * 2 + kv) * num_blocks + block
    chunk offset  = (chunk id * num_kv_heads + head_start) * bytes_per_head_block

Every backend addresses memory this way: NIXL as descriptor lists, shm and Gloo as byte
offsets for memmove.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from proto.kv import KVLayout


def check_block_ids(block_ids: Sequence[int], num_blocks: int, what: str) -> np.ndarray:
    """Block ids as an int64 array; ValueError unless every id is in [0, num_blocks), once.

    Called before any byte moves: an id out of range would make a transport write outside
    the cache, and a repeated one would make two chunks land in the same block.
    """
    ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError(f"{what} must not be empty")
    if ids.min() < 0 or ids.max() >= num_blocks:
        raise ValueError(f"{what} must lie in [0, {num_blocks}), got min {ids.min()} and max {ids.max()}")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{what} must not repeat a block id")
    return ids


def layer_chunk_ids(layout: KVLayout, layer_idx: int, block_ids: np.ndarray) -> np.ndarray:
    """Chunk ids of one layer's blocks: the K chunks in block order, then the V chunks.
    layer_idx is the model's; the cache holds the layers of its stage, from layout.layer_start."""
    if layer_idx not in layout.layers:
        raise ValueError(f"layer {layer_idx} is not in this cache (layers {layout.layer_start}-{layout.layer_end - 1})")
    # ids: [2, num_ids] -> flattened K then V
    kv = np.arange(2, dtype=np.int64)[:, None]
    ids: np.ndarray = (((layer_idx - layout.layer_start) * 2 + kv) * layout.num_blocks + block_ids[None, :]).reshape(-1)
    return ids


def chunk_offsets(layout: KVLayout, chunk_ids: np.ndarray, head_start: int) -> np.ndarray:
    """Byte offsets of the chunks that start at local head `head_start`."""
    return (chunk_ids * layout.num_kv_heads + head_start) * layout.bytes_per_head_block


def all_chunk_offsets(layout: KVLayout, head_start: int) -> np.ndarray:
    """Byte offsets of every chunk of the cache, indexed by chunk id."""
    num_chunks = layout.num_layers * 2 * layout.num_blocks
    return chunk_offsets(layout, np.arange(num_chunks, dtype=np.int64), head_start)


def coalesce(
    src_offsets: np.ndarray, dst_offsets: np.ndarray, nbytes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive chunk pairs that are adjacent on both sides into longer copies.

    Consecutive block ids (a fresh cache hands them out in order) turn a layer's thousands
    of chunk copies into a few long ones; random block maps stay one copy per chunk.
    Returns (src_offsets, dst_offsets, lengths) of the merged runs.
    """
    follows = (src_offsets[1:] == src_offsets[:-1] + nbytes) & (dst_offsets[1:] == dst_offsets[:-1] + nbytes)
    starts = np.flatnonzero(np.concatenate(([True], ~follows)))
    counts = np.diff(np.append(starts, src_offsets.size))
    return src_offsets[starts], dst_offsets[starts], counts * nbytes


def copy_chunks(
    dst_addr: int, dst_offsets: np.ndarray, src_addr: int, src_offsets: np.ndarray, lengths: np.ndarray
) -> None:
    """memmove each (src, dst, length) run between two CPU buffers given by address.

    One memmove per run reads and writes every byte once. torch's index_select/index_copy_
    would go through a staging tensor and, for bfloat16 on CPU, run about 10x slower.
    ctypes releases the GIL during each call, so model compute overlaps the copy. One
    thread already saturates memory bandwidth here: splitting across two measured slower.
    """
    memmove = ctypes.memmove
    for dst, src, n in zip(
        (dst_offsets + dst_addr).tolist(), (src_offsets + src_addr).tolist(), lengths.tolist(), strict=True
    ):
        memmove(dst, src, n)

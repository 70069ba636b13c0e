"""Which KV heads each prefill rank sends to each decode rank when their TP sizes differ.

Heads are split into equal contiguous ranges per rank on both sides. With 8 KV heads,
prefill TP=2 and decode TP=4::

    global heads     0 1 2 3 4 5 6 7
    prefill ranks    [ s0    ][ s1    ]
    decode ranks     [r0 ][r1 ][r2 ][r3 ]

    s0 -> r0: heads 0-1    s0 -> r1: heads 2-3    s1 -> r2: heads 4-5    s1 -> r3: heads 6-7

Every overlap is one contiguous run of heads on both sides, and in the HND layout (proto/kv.py)
a run of heads of one (layer, K|V, block) is one contiguous chunk of memory, so resharding
never copies strided rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.kv import KVLayout


@dataclass(frozen=True)
class HeadSlice:
    """The heads one sender rank moves to one receiver rank: one contiguous run on each side."""

    src_rank: int  # prefill (sender) TP rank
    dst_rank: int  # decode (receiver) TP rank
    src_head_start: int  # first head of the run in the sender's cache (a local head index)
    dst_head_start: int  # first head of the run in the receiver's cache (a local head index)
    num_heads: int  # length of the run


def head_slice(
    total_num_kv_heads: int, src_rank: int, src_tp_size: int, dst_rank: int, dst_tp_size: int
) -> HeadSlice | None:
    """The heads sender rank `src_rank` owes receiver rank `dst_rank`; None when they share none."""
    for name, size in (("src_tp_size", src_tp_size), ("dst_tp_size", dst_tp_size)):
        if size <= 0 or total_num_kv_heads % size:
            raise ValueError(
                f"{name} must be a positive divisor of total_num_kv_heads={total_num_kv_heads}, got {size}"
            )
    if not 0 <= src_rank < src_tp_size or not 0 <= dst_rank < dst_tp_size:
        raise ValueError(
            f"ranks must lie in their TP groups, got src_rank={src_rank} of "
            f"{src_tp_size} and dst_rank={dst_rank} of {dst_tp_size}"
        )
    src_heads = total_num_kv_heads // src_tp_size
    dst_heads = total_num_kv_heads // dst_tp_size
    lo = max(src_rank * src_heads, dst_rank * dst_heads)
    hi = min((src_rank + 1) * src_heads, (dst_rank + 1) * dst_heads)
    if lo >= hi:
        return None
    return HeadSlice(
        src_rank=src_rank,
        dst_rank=dst_rank,
        src_head_start=lo - src_rank * src_heads,
        dst_head_start=lo - dst_rank * dst_heads,
        num_heads=hi - lo,
    )


def head_slices(total_num_kv_heads: int, src_tp_size: int, dst_tp_size: int) -> tuple[HeadSlice, ...]:
    """Every non-empty (sender rank, receiver rank) run, ordered by sender then receiver rank."""
    slices = (
        head_slice(total_num_kv_heads, s, src_tp_size, r, dst_tp_size)
        for s in range(src_tp_size)
        for r in range(dst_tp_size)
    )
    return tuple(s for s in slices if s is not None)


def dst_ranks_of(total_num_kv_heads: int, src_rank: int, src_tp_size: int, dst_tp_size: int) -> tuple[int, ...]:
    """Receiver ranks that hold some of sender rank `src_rank`'s heads: whom it must write to."""
    return tuple(
        s.dst_rank for s in head_slices(total_num_kv_heads, src_tp_size, dst_tp_size) if s.src_rank == src_rank
    )


def src_ranks_of(total_num_kv_heads: int, dst_rank: int, dst_tp_size: int, src_tp_size: int) -> tuple[int, ...]:
    """Sender ranks that hold some of receiver rank `dst_rank`'s heads: whom it must hear from."""
    return tuple(
        s.src_rank for s in head_slices(total_num_kv_heads, src_tp_size, dst_tp_size) if s.dst_rank == dst_rank
    )


# ---- pipeline stages --------------------------------------------------------------------------
#
# With pipeline parallelism a rank holds a range of layers as well as a range of heads
# (KVLayout.layer_bounds, pp_rank). A sender rank then owes a receiver rank the heads they
# share of the layers they share; stages of different sizes on the two sides are fine:
#
#     layers           0 1 2 3 4 5 6 7 8 9
#     prefill stages   [ p0          ][ p1    ]       layer_bounds (0, 6, 10)
#     decode stages    [ d0    ][ d1          ]       layer_bounds (0, 4, 10)
#
#     p0 -> d0: layers 0-3    p0 -> d1: layers 4-5    p1 -> d1: layers 6-9
#
# Messages and transports name layers by the model's index; each side finds its local
# layer as (layer - its layer_start).

RankKey = tuple[int, int]  # (pp_rank, tp_rank): one rank of a worker


def rank_key(layout: KVLayout) -> RankKey:
    return (layout.pp_rank, layout.tp_rank)


def shared_layers(a: KVLayout, b: KVLayout) -> range:
    """The model's layers both ranks hold."""
    return range(max(a.layer_start, b.layer_start), min(a.layer_end, b.layer_end))


def shared_heads(a: KVLayout, b: KVLayout) -> HeadSlice | None:
    """The heads sender `a` moves to receiver `b` of each layer they share; None when they
    share no layer or no head."""
    if not shared_layers(a, b):
        return None
    return head_slice(a.total_num_kv_heads, a.tp_rank, a.tp_size, b.tp_rank, b.tp_size)


def peers_of(me: KVLayout, tp_size: int, layer_bounds: tuple[int, ...]) -> tuple[RankKey, ...]:
    """The ranks of a worker with (tp_size, layer_bounds) that share a layer and a head with `me`,
    ordered by stage then rank: those it writes to (or hears from)."""
    heads = dst_ranks_of(me.total_num_kv_heads, me.tp_rank, me.tp_size, tp_size)
    stages = [
        s
        for s in range(len(layer_bounds) - 1)
        if max(me.layer_start, layer_bounds[s]) < min(me.layer_end, layer_bounds[s + 1])
    ]
    return tuple((s, r) for s in stages for r in heads)


def senders_by_layer(me: KVLayout, tp_size: int, layer_bounds: tuple[int, ...]) -> dict[int, frozenset[RankKey]]:
    """Receiver `me`: for each of its layers, the sender ranks (of a worker with tp_size,
    layer_bounds) that must send it before it is in."""
    heads = src_ranks_of(me.total_num_kv_heads, me.tp_rank, me.tp_size, tp_size)
    out = {}
    for layer in me.layers:
        stage = next(s for s in range(len(layer_bounds) - 1) if layer < layer_bounds[s + 1])
        out[layer] = frozenset((stage, r) for r in heads)
    return out

"""The description of a worker's paged KV cache, as exchanged between workers.

A worker's whole cache is one tensor, allocated once; each attention layer reads and
writes its own view of it::

    cache: [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]
                        |  |           |             |
                        |  |           |             +-- token slot inside the block
                        |  |           +-- KV heads held by this worker (its TP shard)
                        |  +-- physical block id
                        +-- 0 = K, 1 = V

    one (layer, K|V, block) = num_kv_heads x block_size x head_dim elements, contiguous;
    one head of it         = block_size x head_dim elements, contiguous.

Heads sit outside the token slots ("HND") so that a tensor-parallel shard of a block (a
contiguous range of heads) is one contiguous chunk: moving KV between workers with
different TP sizes copies whole chunks, never strided rows.
"""

from __future__ import annotations

from dataclasses import dataclass

KV_LAYOUT_VERSION = 1
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVLayout:
    """Shape, placement and identity of one worker's KV cache."""

    model_id: str  # identity of the weights (name plus config hash); must match across a transfer
    num_layers: int  # attention layers in this rank's cache (its pipeline stage's, see layer_bounds)
    total_num_kv_heads: int  # KV heads of the model, before any tensor-parallel split
    num_kv_heads: int  # KV heads held by this worker: total_num_kv_heads / tp_size
    head_dim: int  # elements per head
    block_size: int  # token slots per block
    num_blocks: int  # physical blocks per layer
    dtype: str  # one of DTYPE_NAMES
    device: str = "cpu"  # "cpu" or "cuda:N"
    tp_rank: int = 0  # this worker's tensor-parallel rank
    tp_size: int = 1  # tensor-parallel size of this worker's group
    version: int = KV_LAYOUT_VERSION  # bumped whenever the memory layout above changes
    pp_rank: int = 0  # this rank's pipeline stage
    # The worker's stages: stage s holds the model's layers [layer_bounds[s], layer_bounds[s + 1]).
    # Empty means one stage, (0, num_layers). Stages may hold different numbers of layers.
    layer_bounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        bounds = tuple(self.layer_bounds) or (0, self.num_layers)  # a list when read from JSON
        object.__setattr__(self, "layer_bounds", bounds)
        if any(not isinstance(b, int) for b in bounds) or bounds[0] != 0 or len(bounds) < 2:
            raise ValueError(f"KVLayout.layer_bounds must be integers from 0, one more than the stages, got {bounds}")
        if any(hi <= lo for lo, hi in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"KVLayout.layer_bounds must increase (every stage holds a layer), got {bounds}")
        if not 0 <= self.pp_rank < len(bounds) - 1:
            raise ValueError(f"KVLayout.pp_rank must be in [0, {len(bounds) - 1}), got {self.pp_rank}")
        if bounds[self.pp_rank + 1] - bounds[self.pp_rank] != self.num_layers:
            raise ValueError(
                f"KVLayout.num_layers must be the layers of stage {self.pp_rank} in layer_bounds {bounds}, "
                f"got {self.num_layers}"
            )
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"KVLayout.dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        for name in (
            "num_layers",
            "total_num_kv_heads",
            "num_kv_heads",
            "head_dim",
            "block_size",
            "num_blocks",
            "tp_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")
        if self.total_num_kv_heads % self.tp_size or self.num_kv_heads != self.total_num_kv_heads // self.tp_size:
            raise ValueError(
                f"KVLayout.num_kv_heads must be total_num_kv_heads / tp_size = "
                f"{self.total_num_kv_heads} / {self.tp_size}, got {self.num_kv_heads}"
            )

    @property
    def pp_size(self) -> int:
        return len(self.layer_bounds) - 1

    @property
    def layer_start(self) -> int:
        """The model's index of this rank's first layer (its local layer 0)."""
        return self.layer_bounds[self.pp_rank]

    @property
    def layer_end(self) -> int:
        return self.layer_bounds[self.pp_rank + 1]

    @property
    def layers(self) -> range:
        """The model's indices of this rank's layers."""
        return range(self.layer_start, self.layer_end)

    @property
    def total_num_layers(self) -> int:
        """The model's layers, over every stage."""
        return self.layer_bounds[-1]

    @property
    def head_offset(self) -> int:
        """Index of this worker's first KV head among the model's heads."""
        return self.tp_rank * self.num_kv_heads

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, 2, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_head_block(self) -> int:
        """Bytes of one head of one (layer, K|V, block): the unit of a resharded copy."""
        return self.block_size * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV that one token occupies on this rank: its layers and heads, K and V."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def model_bytes_per_token(self) -> int:
        """Bytes of KV that one token occupies over the whole worker: every layer and head."""
        return 2 * self.total_num_layers * self.total_num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

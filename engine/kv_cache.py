"""The paged KV cache: one tensor allocated once, one view per attention layer.

The memory layout is drawn in proto/kv.py (KVLayout); block ids index dimension 2.
"""

from __future__ import annotations

import torch

from proto.kv import KVLayout

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVCache:
    """Owns the cache tensor. Layers get views; transports read and write blocks of it."""

    def __init__(self, layout: KVLayout):
        self.layout = layout
        # cache: [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]
        self.tensor = torch.zeros(layout.shape, dtype=TORCH_DTYPES[layout.dtype], device=layout.device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of one layer (the model's index; a pipeline stage's cache holds its
        layers from layout.layer_start), each [num_blocks, num_kv_heads, block_size, head_dim]."""
        local = layer_idx - self.layout.layer_start
        return self.tensor[local, 0], self.tensor[local, 1]

    @property
    def num_bytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

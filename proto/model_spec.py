"""The model a plan serves, as the planner sees it: its shape, precision and where it lives.

In YAML (a named architecture from planner/latency/models.py needs only ``name`` and optionally
``dtype`` and ``path``; any other model lists every field)::

    name: llama-2-7b
    num_layers: 32
    hidden_size: 4096
    num_heads: 32
    num_kv_heads: 32
    intermediate_size: 11008
    vocab_size: 32000
    mlp: gated                 # optional: gated (Llama's SwiGLU, 3 matrices) or dense (OPT's, 2)
    dtype: float16
    path: /models/llama-2-7b   # optional: the checkpoint directory `tandem serve` loads
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from proto.kv import DTYPE_BYTES, DTYPE_NAMES
from proto.schema import as_int, as_str, check_keys

SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
# gated: gate, up and down projections (Llama's SwiGLU); dense: up and down (OPT's ReLU MLP).
MLP_KINDS = ("gated", "dense")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer whose weights and KV the planner sizes: Llama's family
    (gated MLP, grouped-query attention) or OPT's (two-matrix MLP, multi-head attention).
    Biases, norms and learned position embeddings are under 0.2% of the weights; norms are
    counted, biases and positions are not."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int  # attention (query) heads
    num_kv_heads: int  # key/value heads (grouped-query attention when fewer than num_heads)
    intermediate_size: int  # MLP width (OPT's ffn_dim)
    vocab_size: int
    dtype: str = "float16"  # one of DTYPE_NAMES: weights and KV cache
    head_dim: int = 0  # 0 = hidden_size / num_heads
    tie_word_embeddings: bool = False
    mlp: str = "gated"  # one of MLP_KINDS: 3 (gated) or 2 (dense) matrices of hidden x intermediate
    path: str | None = None  # local checkpoint directory, for `tandem serve`

    def __post_init__(self) -> None:
        as_str("model.name", self.name)
        for name in SHAPE_FIELDS:
            as_int(f"model.{name}", getattr(self, name), minimum=1)
        as_str("model.dtype", self.dtype, DTYPE_NAMES)
        as_str("model.mlp", self.mlp, MLP_KINDS)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads ({self.num_kv_heads}) must divide model.num_heads ({self.num_heads})")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"model.hidden_size ({self.hidden_size}) must be a multiple of "
                    f"model.num_heads ({self.num_heads}) unless model.head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        as_int("model.head_dim", self.head_dim, minimum=1)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def params_per_layer(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2  # q, o; k, v
        mlp = (3 if self.mlp == "gated" else 2) * h * self.intermediate_size  # gate/up/down or up/down
        return attention + mlp + 2 * h  # two norms

    @property
    def num_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.params_per_layer + embeddings + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all layers, all KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelSpec:
        check_keys("model", data, ("name",) + SHAPE_FIELDS, ("dtype", "head_dim", "tie_word_embeddings", "mlp", "path"))
        return ModelSpec(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["path"] is None:
            del out["path"]
        return out

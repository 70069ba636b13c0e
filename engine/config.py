"""Model and engine settings. ModelConfig is read from a Hugging Face config.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Hugging Face architecture name -> whether q/k/v projections carry a bias by default.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
DTYPES = ("float32", "float16", "bfloat16")
LOAD_FORMATS = ("checkpoint", "dummy")


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a Llama-family checkpoint."""

    model_id: str  # directory name plus a hash of config.json: the identity KV transfers check
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # HF rope parameters beyond theta; type "llama3" or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer: window in tokens, or None for full
    eos_token_id: int | tuple[int, ...] | None
    checkpoint_dtype: str  # the dtype the weights were saved in

    @staticmethod
    def from_dir(model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
        raw = config_file.read_text()
        model_id = f"{path.name}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"
        return ModelConfig.from_hf_dict(json.loads(raw), model_id)

    @staticmethod
    def from_hf_dict(cfg: dict[str, Any], model_id: str) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} (model_type "
                f"{cfg.get('model_type')!r}); supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; supported: 'silu'")
        num_heads = cfg["num_attention_heads"]
        num_layers = cfg["num_hidden_layers"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: 'default', 'llama3'")
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        return ModelConfig(
            model_id=model_id,
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("attention_bias", SUPPORTED_ARCHITECTURES[arch]),
            o_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            sliding_windows=_sliding_windows(cfg, arch, num_layers),
            eos_token_id=_as_token_ids(cfg.get("eos_token_id")),
            checkpoint_dtype=dtype if dtype in DTYPES else "float32",
        )


def _sliding_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        window = None
    layer_types = cfg.get("layer_types")
    if window is None:
        return (None,) * num_layers
    if layer_types is None:
        return (window,) * num_layers
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _as_token_ids(value: object) -> int | tuple[int, ...] | None:
    """config.json's eos_token_id: one id, a list of ids, or absent."""
    if isinstance(value, list):
        return tuple(value)
    if value is None or isinstance(value, int):
        return value
    raise ValueError(f"config.json: eos_token_id must be an int or a list of ints, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs a model: precision, cache geometry and batch limits."""

    dtype: str = "auto"  # float32 | float16 | bfloat16 | auto (checkpoint dtype on GPU, float32 on CPU)
    device: str = "auto"  # cpu | cuda | cuda:N | auto (cuda when available)
    block_size: int = 16  # token slots per KV block
    max_num_seqs: int = 64  # running batch size at most
    max_num_batched_tokens: int = 512  # tokens per step at most (the prefill chunk budget)
    max_model_len: int | None = None  # context window; default: the model's, capped at 4096
    num_blocks: int | None = None  # KV blocks; default: from kv_cache_bytes
    kv_cache_bytes: int | None = None  # default: 1 GiB on CPU, 90% of free GPU memory on GPU
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1  # ranks (GPUs) each pipeline stage is split over; see engine/parallel.py
    pipeline_parallel_size: int = 1  # stages, each holding a contiguous range of the layers
    # layers of each stage, in order (uneven splits); default: as even as can be
    pipeline_layers: tuple[int, ...] | None = None
    # micro-batches a step is cut into so that the stages overlap; default: one per stage
    pipeline_microbatches: int | None = None
    # "checkpoint": the directory's weights; "dummy": random weights of config.json's shapes,
    # made on the device (no weight files needed: speed measurements of a model's shape)
    load_format: str = "checkpoint"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES + ("auto",):
            raise ValueError(f"dtype must be one of {DTYPES + ('auto',)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "num_blocks",
            "kv_cache_bytes",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "pipeline_microbatches",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.pipeline_layers is not None:
            layers = tuple(self.pipeline_layers)
            object.__setattr__(self, "pipeline_layers", layers)
            if len(layers) != self.pipeline_parallel_size or any(n <= 0 for n in layers):
                raise ValueError(
                    f"pipeline_layers must give a positive layer count for each of the "
                    f"pipeline_parallel_size={self.pipeline_parallel_size} stages, got {layers}"
                )

    @property
    def num_ranks(self) -> int:
        """Processes one engine runs as: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

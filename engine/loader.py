"""Builds a LlamaModel from a Hugging Face checkpoint directory (safetensors, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.model import LlamaModel

# Hugging Face projections that our model stores fused, in this order.
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model directory {str(model_dir)!r} has no *.safetensors weights")
    return files


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name.removeprefix("model.")] = f.get_tensor(name)
    return tensors


def to_fused(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face weights to ours, concatenating the projections we fuse."""
    out: dict[str, torch.Tensor] = {}
    parts_of = {part: fused for fused, parts in FUSED.items() for part in parts}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in hf.items():
        if "rotary_emb" in name:
            continue  # recomputed from the config
        *prefix, module, kind = name.split(".")
        fused = parts_of.get(module)
        if fused is None:
            out[name] = tensor
            continue
        key = ".".join([*prefix, fused, kind])
        pending.setdefault(key, {})[module] = tensor
    for key, parts in pending.items():
        fused = key.split(".")[-2]
        missing = [p for p in FUSED[fused] if p not in parts]
        if missing:
            raise ValueError(f"checkpoint is missing {missing} for {key}")
        out[key] = torch.cat([parts[p] for p in FUSED[fused]], dim=0)
    return out


def random_model(config: ModelConfig, dtype: torch.dtype, device: str, max_positions: int, seed: int = 0) -> LlamaModel:
    """A model of config's shapes with small random weights, built on `device` directly (an
    8B model appears on a GPU in seconds, with no checkpoint read)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaModel(config, max_positions)
    weights = {}
    for name, param in model.named_parameters():
        if "norm" in name and param.dim() == 1:  # RMSNorm scales
            weights[name] = torch.ones(param.shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            weights[name] = torch.zeros(param.shape, dtype=dtype, device=device)
        else:  # std 0.02, as Llama initialises: activations stay finite in fp16
            weights[name] = torch.empty(param.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
    model.load_state_dict(weights, assign=True)
    model.rotary = type(model.rotary)(config, max_positions)
    return model.to(device).eval()


def load_model(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: str, max_positions: int
) -> LlamaModel:
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = LlamaModel(config, max_positions)
    weights = to_fused(read_state_dict(model_dir))
    expected = set(model.state_dict().keys())
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {str(model_dir)!r} does not match {config.architecture}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in weights.items():
        expected_shape = model.get_parameter(name).shape
        if tensor.shape != expected_shape:
            raise ValueError(
                f"weight {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected_shape)}"
            )
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    # Buffers (rotary tables) are not in the checkpoint: build them for real, in float32.
    model.rotary = type(model.rotary)(config, max_positions)
    return model.to(device).eval()

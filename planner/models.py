"""Named model architectures, and reading a model spec from what the user passes.

`--model` takes one of: a name from ARCHITECTURES (``llama-2-7b``), a checkpoint directory
or its config.json (read with the engine's own config parser, so the planner and the
engine agree on the model's shape), or a YAML/JSON file with the ModelSpec fields.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from proto.model_spec import ModelSpec
from proto.schema import check_keys, load_document


def _arch(name, layers, hidden, heads, kv_heads, inter, vocab, dtype="float16", tied=False) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=kv_heads, intermediate_size=inter, vocab_size=vocab, dtype=dtype,
                     tie_word_embeddings=tied)


# Shapes from the models' published Hugging Face config.json files.
ARCHITECTURES: dict[str, ModelSpec] = {m.name: m for m in (
    #     name              layers hidden heads kv  intermediate vocab
    _arch("llama-2-7b",      32,   4096,  32,   32,  11008,      32000),
    _arch("llama-2-13b",     40,   5120,  40,   40,  13824,      32000),
    _arch("llama-2-70b",     80,   8192,  64,    8,  28672,      32000),
    _arch("llama-3-8b",      32,   4096,  32,    8,  14336,     128256, "bfloat16"),
    _arch("llama-3-70b",     80,   8192,  64,    8,  28672,     128256, "bfloat16"),
    _arch("llama-3.1-405b", 126,  16384, 128,    8,  53248,     128256, "bfloat16"),
    _arch("mistral-7b",      32,   4096,  32,    8,  14336,      32000, "bfloat16"),
    _arch("qwen2.5-32b",     64,   5120,  40,    8,  27648,     152064, "bfloat16"),
)}


def from_hf_config(config: dict, name: str, path: str | None) -> ModelSpec:
    from engine.config import ModelConfig  # the engine's parser: one reading of config.json

    cfg = ModelConfig.from_hf_dict(config, name)
    return ModelSpec(name=name, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                     num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                     dtype=cfg.checkpoint_dtype, head_dim=cfg.head_dim,
                     tie_word_embeddings=cfg.tie_word_embeddings, path=path)


def resolve_model(arg: str, dtype: str | None = None) -> ModelSpec:
    """The ModelSpec for a --model argument; dtype, when given, overrides the model's."""
    path = Path(arg)
    if arg in ARCHITECTURES:
        spec = ARCHITECTURES[arg]
    elif path.is_dir() or path.name == "config.json":
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(f"model: {str(config_file)!r} does not exist")
        model_dir = config_file.parent.resolve()
        spec = from_hf_config(json.loads(config_file.read_text()), model_dir.name, str(model_dir))
    elif path.suffix in (".yaml", ".yml", ".json"):
        spec = model_from_dict(load_document(path, "model"))
    else:
        raise ValueError(f"model {arg!r} is neither a known architecture ({', '.join(ARCHITECTURES)}) "
                         f"nor a checkpoint directory, config.json or YAML file")
    return replace(spec, dtype=dtype) if dtype else spec


def model_from_dict(data: dict) -> ModelSpec:
    """A full ModelSpec mapping, or a named architecture with dtype/path overrides."""
    if isinstance(data, dict) and data.get("name") in ARCHITECTURES and "num_layers" not in data:
        check_keys("model", data, ("name",), ("dtype", "path"))
        return replace(ARCHITECTURES[data["name"]], **{k: v for k, v in data.items() if k != "name"})
    return ModelSpec.from_dict(data)

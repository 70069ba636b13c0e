"""Named model architectures, and reading a model spec from what the user passes.

`--model` takes one of: a name from ARCHITECTURES (``llama-2-7b``), a checkpoint directory
or its config.json (read with the engine's own config parser, so the planner and the
engine agree on the model's shape; OPT's, which the engine does not run, by the planner),
or a YAML/JSON file with the ModelSpec fields. A config.json the planner cannot size (an
unknown architecture, a mixture of experts) is refused by name, not sized as a Llama.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from proto.kv import DTYPE_NAMES
from proto.model_spec import ModelSpec
from proto.schema import check_keys, load_document

# Fields that mark a mixture of experts: its weights and its compute per token differ.
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _arch(name, layers, hidden, heads, kv_heads, inter, vocab, dtype="float16", tied=False, mlp="gated") -> ModelSpec:
    return ModelSpec(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        dtype=dtype,
        tie_word_embeddings=tied,
        mlp=mlp,
    )


# Shapes from the models' published Hugging Face config.json files.
ARCHITECTURES: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        #     name              layers hidden heads kv  intermediate vocab
        _arch("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        _arch("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
        _arch("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
        _arch("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, "bfloat16"),
        _arch("llama-3-70b", 80, 8192, 64, 8, 28672, 128256, "bfloat16"),
        _arch("llama-3.1-405b", 126, 16384, 128, 8, 53248, 128256, "bfloat16"),
        _arch("mistral-7b", 32, 4096, 32, 8, 14336, 32000, "bfloat16"),
        _arch("qwen2.5-32b", 64, 5120, 40, 8, 27648, 152064, "bfloat16"),
        # OPT: a two-matrix ReLU MLP (ffn_dim), tied embeddings, 2,048 positions.
        _arch("opt-13b", 40, 5120, 40, 40, 20480, 50272, tied=True, mlp="dense"),
        _arch("opt-66b", 64, 9216, 72, 72, 36864, 50272, tied=True, mlp="dense"),
        _arch("opt-175b", 96, 12288, 96, 96, 49152, 50272, tied=True, mlp="dense"),
    )
}


def from_hf_config(config: dict, name: str, path: str | None) -> ModelSpec:
    from engine.config import SUPPORTED_ARCHITECTURES, ModelConfig  # one reading of config.json

    for field in MOE_FIELDS:
        if config.get(field):
            raise ValueError(
                f"config.json {field}: a mixture-of-experts model, which the planner cannot size "
                f"(its weights and its compute per token differ from a dense model's)"
            )
    arch = (config.get("architectures") or [None])[0]
    if arch == "OPTForCausalLM":
        return _opt_from_hf(config, name, path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"config.json architectures {arch} is not one the planner can size; known: "
            f"{', '.join([*SUPPORTED_ARCHITECTURES, 'OPTForCausalLM'])}"
        )
    cfg = ModelConfig.from_hf_dict(config, name)
    return ModelSpec(
        name=name,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        dtype=cfg.checkpoint_dtype,
        head_dim=cfg.head_dim,
        tie_word_embeddings=cfg.tie_word_embeddings,
        path=path,
    )


def _opt_from_hf(config: dict, name: str, path: str | None) -> ModelSpec:
    """OPT's config.json: ffn_dim is its two-matrix MLP's width."""

    def need(key: str):
        if key not in config:
            raise ValueError(f"config.json {key} is required for OPTForCausalLM")
        return config[key]

    hidden = need("hidden_size")
    if config.get("word_embed_proj_dim", hidden) != hidden:
        raise ValueError(
            f"config.json word_embed_proj_dim ({config['word_embed_proj_dim']}) differs from "
            f"hidden_size ({hidden}): the planner cannot size OPT's projections in and out"
        )
    dtype = config.get("torch_dtype") or "float32"
    return ModelSpec(
        name=name,
        num_layers=need("num_hidden_layers"),
        hidden_size=hidden,
        num_heads=need("num_attention_heads"),
        num_kv_heads=need("num_attention_heads"),
        intermediate_size=need("ffn_dim"),
        vocab_size=need("vocab_size"),
        dtype=dtype if dtype in DTYPE_NAMES else "float32",
        tie_word_embeddings=config.get("tie_word_embeddings", True),
        mlp="dense",
        path=path,
    )


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
        raise ValueError(
            f"model {arg!r} is neither a known architecture ({', '.join(ARCHITECTURES)}) "
            f"nor a checkpoint directory, config.json or YAML file"
        )
    return replace(spec, dtype=dtype) if dtype else spec


def model_from_dict(data: dict) -> ModelSpec:
    """A full ModelSpec mapping, or a named architecture with dtype/path overrides."""
    if isinstance(data, dict) and data.get("name") in ARCHITECTURES and "num_layers" not in data:
        check_keys("model", data, ("name",), ("dtype", "path"))
        return replace(ARCHITECTURES[data["name"]], **{k: v for k, v in data.items() if k != "name"})
    return ModelSpec.from_dict(data)

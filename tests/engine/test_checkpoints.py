"""Loading: dtypes, sharded checkpoints, and the embedded default model."""

import json

import pytest
import torch

from deploy.cli import main
from engine import LLM, SamplingParams
from engine.default_model import make_default_model
from tests.checkpoints import hf_greedy, make_checkpoint


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_loads_and_generates(checkpoints, dtype):
    llm = LLM(checkpoints["llama"], dtype=dtype)
    assert llm.engine.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    out = llm.generate([[3, 4, 5, 6]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6


def test_sharded_checkpoint_matches_transformers(tmp_path, tokenizer_dir):
    model_dir = tmp_path / "sharded"
    make_checkpoint(model_dir, "llama", tokenizer_dir, seed=5)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(model_dir)).save_pretrained(str(model_dir), max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    prompt = [7, 8, 9, 10, 11]
    out = LLM(model_dir).generate([prompt], SamplingParams(temperature=0.0, max_tokens=10))[0]
    assert out.token_ids == hf_greedy(model_dir, prompt, 10)


def test_default_model_builds_and_serves_text(tmp_path):
    # A few steps only: this checks the recipe end to end, not the model's quality.
    model_dir = make_default_model(tmp_path / "default", steps=3, log=lambda _: None)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    out = LLM(model_dir).generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert isinstance(out.text, str) and len(out.token_ids) >= 1


def test_generate_command_prints_text(checkpoints, capsys):
    assert main(["generate", "--model", str(checkpoints["llama"]), "--max-tokens", "5", "Once"]) == 0
    printed = capsys.readouterr().out
    assert ">>> Once" in printed and "tokens/s" in printed


def test_generate_command_reports_missing_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dummy_load_format_builds_the_shape_without_weight_files(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError):
        LLM(tmp_path)  # no weights: a checkpoint load fails
    llm = LLM(tmp_path, load_format="dummy")
    params = dict(llm.engine.model.named_parameters())
    assert params["layers.1.mlp.down_proj.weight"].shape == (32, 64)
    assert bool((params["norm.weight"] == 1).all())
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and all(0 <= t < 300 for t in out.token_ids)
    with pytest.raises(ValueError, match="load_format must be one of"):
        LLM(tmp_path, load_format="random")

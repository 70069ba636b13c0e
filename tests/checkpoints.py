"""Tiny random Hugging Face checkpoints (Llama, Qwen2, Mistral) with a trained tokenizer."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from engine.default_model.corpus import stories
from engine.default_model.tokenizer import train_tokenizer

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # Wider weights than the default 0.02 make logits peaked, so argmax ties between
    # two correct implementations are unlikely.
    initializer_range=0.1,
)


def make_tokenizer(path: Path) -> Path:
    train_tokenizer(stories(300, seed=1), vocab_size=TINY["vocab_size"], out_dir=path)
    return path


def make_checkpoint(
    path: Path,
    arch: str,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Save a seeded random model of the given architecture into path."""
    import transformers

    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[arch]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[arch]
    kwargs = {**TINY, "bos_token_id": 0, "eos_token_id": 1, **overrides}
    if arch == "mistral":
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).to(dtype)
    model.save_pretrained(str(path))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, path / f.name)
    return path


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """The oracle: transformers generate, greedy, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = _hf_models.get(model_dir)
    if model is None:
        model = _hf_models[model_dir] = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    if ignore_eos:  # generate() stops at EOS whatever the config says: step the model by hand
        return _greedy_past_eos(model, prompt_ids, max_new_tokens)
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.update(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
    return out[0, len(prompt_ids) :].tolist()


def _greedy_past_eos(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding that goes on through EOS (the engine's ignore_eos), with the HF cache."""
    out: list[int] = []
    ids, past = torch.tensor([prompt_ids]), None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            out.append(int(result.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


_hf_models: dict = {}

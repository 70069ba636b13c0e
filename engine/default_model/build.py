"""Builds the default model: generate the corpus, train the tokenizer, train a tiny Llama.

The result is an ordinary Hugging Face checkpoint directory (config.json, safetensors,
tokenizer files), so it loads exactly like any other local checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

from engine.default_model.corpus import stories
from engine.default_model.tokenizer import train_tokenizer

NAME = "tandem-tiny-stories-v1"
VOCAB_SIZE = 2048
SEQ_LEN = 128
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
# A Llama-3-shaped decoder (GQA, tied embeddings), about 2M parameters.
ARCHITECTURE: dict[str, Any] = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def default_model_dir() -> Path:
    """$TANDEM_CACHE_DIR, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem; then models/NAME."""
    root = os.environ.get("TANDEM_CACHE_DIR")
    cache = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem"
    return cache / "models" / NAME


def ensure_default_model(log: Callable[[str], None] = print) -> Path:
    """The default model's directory, built first if it is not there yet."""
    path = default_model_dir()
    if not (path / "config.json").is_file():
        log(f"building the default model {NAME} in {path} (about a minute, once)")
        make_default_model(path, log=log)
    return path


def make_default_model(
    out_dir: str | Path, steps: int = 200, seed: int = 0, log: Callable[[str], None] = print
) -> Path:
    """Train and save the default model into out_dir (replaced atomically if it exists)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=out_dir.parent))
    try:
        torch.manual_seed(seed)
        texts = stories(6000, seed)
        tokenizer = train_tokenizer(texts, VOCAB_SIZE, work)
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for text in texts:
            ids += tokenizer.encode(text) + [eos]
        data = torch.tensor(ids, dtype=torch.int64)
        log(f"corpus: {len(texts)} stories, {len(ids)} tokens; vocabulary {len(tokenizer)}")

        config = LlamaConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, **ARCHITECTURE
        )
        model = LlamaForCausalLM(config)
        _train(model, data, steps, seed, log)
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(str(work))
        (work / "tandem.json").write_text(json.dumps({"name": NAME, "steps": steps, "seed": seed}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"default model saved in {out_dir}")
    return out_dir


def _train(model: LlamaForCausalLM, data: torch.Tensor, steps: int, seed: int, log: Callable[[str], None]) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    start = time.monotonic()
    for step in range(1, steps + 1):
        offsets = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH_SIZE,), generator=gen)
        batch = torch.stack([data[o : o + SEQ_LEN] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            elapsed = time.monotonic() - start
            log(
                f"  train step {step}/{steps}  loss {loss.item():.3f}  "
                f"{elapsed:.0f}s elapsed, ~{elapsed / step * (steps - step):.0f}s left"
            )
    model.eval()

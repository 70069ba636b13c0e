"""Loads a checkpoint's tokenizer from its directory, never from the network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase | None:
    """The directory's Hugging Face tokenizer, or None when it ships none."""
    path = Path(model_dir)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

"""Suite-wide settings: never touch the network; interpret Triton kernels when there is no GPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs: kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

from tests.checkpoints import make_checkpoint, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama with a trained tokenizer, shared by the serving tests."""
    root = tmp_path_factory.mktemp("tiny_llama")
    return make_checkpoint(root / "tiny-llama", "llama", make_tokenizer(root / "tokenizer"))

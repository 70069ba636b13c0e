"""Suite-wide settings: never touch the network; interpret Triton kernels when there is no GPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs: kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

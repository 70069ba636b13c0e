"""Tandem's model engine: a Llama-family model over a paged KV cache with continuous batching.

    from engine import LLM, SamplingParams
    llm = LLM(model_dir, dtype="float32", block_size=16, max_num_seqs=32)
    outputs = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=32))

The pure-Python parts (sampling parameters, block hashing, the scheduler and block manager)
load without torch: the router and the planner's simulator use them. The model side (LLM,
LLMEngine) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from engine.config import EngineConfig, ModelConfig
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine, RequestOutput

__all__ = ["LLM", "LLMEngine", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams"]
_LAZY = {"LLM": "engine.llm", "LLMEngine": "engine.llm_engine", "RequestOutput": "engine.llm_engine"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

"""Tandem's model engine: a Llama-family model over a paged KV cache with continuous batching.

    from engine import LLM, SamplingParams
    llm = LLM(model_dir, dtype="float32", block_size=16, max_num_seqs=32)
    outputs = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=32))
"""

from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams"]

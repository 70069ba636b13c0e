"""The offline API, in the style of vLLM: LLM(model_dir).generate(prompts, params)."""

from __future__ import annotations

import itertools
from pathlib import Path

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    """Runs batches of prompts to completion through the engine's continuous batching."""

    def __init__(self, model: str | Path, **engine_args):
        self.engine = LLMEngine(model, EngineConfig(**engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        A prompt is a string or a list of token ids; a single prompt may be passed bare.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params, strict=True):
                self.engine.add_request(request_id, prompt, p)
            results: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return [results[i] for i in ids]

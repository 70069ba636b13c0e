"""The offline API, in the style of vLLM: LLM(model_dir).generate(prompts, params)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from typing_extensions import TypeIs

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    """Runs batches of prompts to completion through the engine's continuous batching."""

    def __init__(self, model: str | Path, **engine_args: Any):
        self.engine = LLMEngine(model, EngineConfig(**engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        A prompt is a string or a list of token ids; a single prompt may be passed bare.
        """
        batch: Sequence[str | list[int]]
        if isinstance(prompts, str) or _is_token_ids(prompts):
            batch = [prompts]
        else:
            batch = prompts
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"got {len(params)} sampling_params for {len(batch)} prompts")
        ids = [f"gen-{next(self._ids)}" for _ in batch]
        try:
            for request_id, prompt, p in zip(ids, batch, params, strict=True):
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


def _is_token_ids(prompts: list[int] | list[str] | list[list[int]]) -> TypeIs[list[int]]:
    """A single prompt passed bare as token ids (rather than a list of prompts)."""
    return bool(prompts) and isinstance(prompts[0], int)

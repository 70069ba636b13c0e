"""Turns the last-position logits of a batch into one next token per sequence."""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits outside the top-k / top-p sets to -inf. logits: [V] float32."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely already reach top_p; the most
        # likely token is therefore always kept.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Greedy rows are decided in one argmax; sampled rows use a per-request generator."""

    def __init__(self) -> None:
        self.generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams]) -> list[int]:
        """logits: [B, V] for B sequences, in the order of request_ids."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1).tolist()
        for row, (request_id, p) in enumerate(zip(request_ids, params)):
            if p.greedy:
                continue
            # Sampled rows go to the CPU, where the per-request generators live.
            row_logits = apply_top_k_top_p(logits[row].cpu() / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(row_logits, dim=-1)
            tokens[row] = int(torch.multinomial(probs, 1, generator=self._generator(request_id, p)))
        return tokens

    def _generator(self, request_id: str, p: SamplingParams) -> torch.Generator | None:
        if p.seed is None:
            return None
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device="cpu").manual_seed(p.seed)
            self.generators[request_id] = gen
        return gen

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self.generators.pop(request_id, None)

"""Turns the last-position logits of a batch into one next token per sequence.

Sampling is per request, so a failure is per request too: sample() returns the rows it
could not sample with the reason, and the engine fails only those requests while the rest
of the batch goes on.
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature without overflow: the largest logit becomes 0 and the others
    non-positive, so that any finite temperature > 0 (down to 5e-324, which is 0 in
    float32) gives a distribution, one-hot on the argmax in the limit. logits: [V] float32."""
    shifted = logits - logits.max()
    # A tiny temperature rounds to 0 in float32: 0/0 would be NaN at the maximum, so it is kept at 0.
    return torch.where(shifted == 0, shifted, shifted / temperature)


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits outside the top-k / top-p sets to -inf. logits: [V] float32.

    The most likely token always survives, whatever top_p (1e-300 is 0 in float32)."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely already reach top_p.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Greedy rows are decided in one argmax; sampled rows use a per-request generator."""

    def __init__(self) -> None:
        self.generators: dict[str, torch.Generator] = {}

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> tuple[list[int | None], dict[str, str]]:
        """logits: [B, V] for B sequences, in the order of request_ids.

        Returns a token per row (None for a row that failed) and, by request id, why each
        failed row failed.
        """
        logits = logits.float()
        tokens: list[int | None] = logits.argmax(dim=-1).tolist()
        failures: dict[str, str] = {}
        for row, (request_id, p) in enumerate(zip(request_ids, params, strict=True)):
            if p.greedy:
                continue
            try:
                tokens[row] = self._sample_row(logits[row], request_id, p)
            except (RuntimeError, ValueError) as exc:  # this request's settings or state, not the batch's
                tokens[row] = None
                failures[request_id] = f"sampling failed: {exc}"
        return tokens, failures

    def _sample_row(self, logits: torch.Tensor, request_id: str, p: SamplingParams) -> int:
        # Sampled rows go to the CPU, where the per-request generators live.
        row_logits = apply_top_k_top_p(scale_logits(logits.cpu(), p.temperature), p.top_k, p.top_p)
        probs = torch.softmax(row_logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(request_id, p)))

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

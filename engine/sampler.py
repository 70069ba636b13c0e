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
    """Greedy rows are decided in one argmax; sampled rows draw on the CPU.

    A seeded request's draw for its n-th generated token depends only on (seed, n): the
    same seed gives the same tokens however the request was batched, preempted, or resumed
    on another worker after its own was lost (the sampler keeps no per-request state)."""

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams], positions: list[int]
    ) -> tuple[list[int | None], dict[str, str]]:
        """logits: [B, V] for B sequences, in the order of request_ids; positions: how many
        tokens each has generated before this one.

        Returns a token per row (None for a row that failed) and, by request id, why each
        failed row failed.
        """
        logits = logits.float()
        tokens: list[int | None] = logits.argmax(dim=-1).tolist()
        failures: dict[str, str] = {}
        for row, (request_id, p, n) in enumerate(zip(request_ids, params, positions, strict=True)):
            if p.greedy:
                continue
            try:
                tokens[row] = self._sample_row(logits[row], p, n)
            except (RuntimeError, ValueError) as exc:  # this request's settings or state, not the batch's
                tokens[row] = None
                failures[request_id] = f"sampling failed: {exc}"
        return tokens, failures

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, position: int) -> int:
        # Sampled rows go to the CPU, where the generators live.
        row_logits = apply_top_k_top_p(scale_logits(logits.cpu(), p.temperature), p.top_k, p.top_p)
        probs = torch.softmax(row_logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=_generator(p.seed, position)))


_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio: spreads consecutive positions apart


def _generator(seed: int | None, position: int) -> torch.Generator | None:
    """The draw for a seeded request's token at `position`: its own stream, from (seed, position)."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed((seed + (position + 1) * _GOLDEN) % 2**64)

import math

import pytest
import torch

from engine.sampler import Sampler, apply_top_k_top_p
from engine.sampling_params import SamplingParams


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0.0)] * 2
    assert Sampler().sample(logits, ["a", "b"], params, [0, 3]) == ([1, 0], {})


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    kept = torch.isfinite(apply_top_k_top_p(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [False, True, True, False, False]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = torch.isfinite(apply_top_k_top_p(logits, top_k=0, top_p=0.8))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(apply_top_k_top_p(logits, top_k=0, top_p=0.81))
    assert kept.tolist() == [True, True, True, False]
    # The most likely token survives even a tiny top_p.
    assert torch.isfinite(apply_top_k_top_p(logits, 0, 0.01)).tolist() == [True, False, False, False]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).repeat(1, 1)

    def draw(seed, n=20):
        sampler = Sampler()
        p = SamplingParams(temperature=1.0, seed=seed)
        return [sampler.sample(logits, ["r"], [p], [i])[0][0] for i in range(n)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sampling_never_picks_masked_tokens():
    logits = torch.zeros(1, 10)
    p = SamplingParams(temperature=1.0, top_k=3, seed=0)
    logits[0, [2, 5, 7]] = 1.0
    sampler = Sampler()
    picks = {sampler.sample(logits, ["r"], [p], [i])[0][0] for i in range(50)}
    assert picks <= {2, 5, 7} and len(picks) > 1


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30, 1e-7, 1e30, 1e300])
def test_extreme_temperatures_sample_from_a_distribution(temperature):
    # 1e-300 is 0 in float32: dividing by it naively gives NaN at the maximum and inf elsewhere.
    logits = torch.tensor([[0.5, 3.0, -1.0, 3.0 - 1e-3]])
    p = SamplingParams(temperature=temperature, seed=7)
    tokens, failures = Sampler().sample(logits, ["r"], [p], [0])
    assert failures == {} and 0 <= tokens[0] < 4
    if temperature < 1e-6:
        assert tokens[0] == 1  # the limit of a vanishing temperature is the argmax


def test_a_tiny_top_p_keeps_the_argmax_even_when_it_is_zero_in_float32():
    logits = torch.tensor([[0.1, 2.0, 1.0]])
    for top_p in (1e-300, 1e-45, 1e-30):
        tokens, failures = Sampler().sample(logits, ["r"], [SamplingParams(top_p=top_p, seed=0)], [0])
        assert (tokens, failures) == ([1], {})


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.tensor([[0.1, 2.0, 1.0], [math.nan, math.nan, math.nan], [3.0, 0.0, 0.0]])
    params = [
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=1.0, seed=2),
        SamplingParams(temperature=0.0),
    ]
    tokens, failures = Sampler().sample(logits, ["a", "bad", "c"], params, [0, 0, 0])
    assert tokens[1] is None and set(failures) == {"bad"} and "sampling failed" in failures["bad"]
    assert tokens[0] in (0, 1, 2) and tokens[2] == 0


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", math.nan, "temperature must be a finite number"),
        ("temperature", math.inf, "temperature must be a finite number"),
        ("temperature", True, "temperature must be a finite number"),
        ("top_p", math.nan, r"top_p must be in \(0, 1\]"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("seed", 2**64, r"seed must be an integer in \[0, 2\*\*64\)"),
        ("seed", -1, r"seed must be an integer in \[0, 2\*\*64\)"),
        ("seed", 1.5, r"seed must be an integer"),
        ("stop_token_ids", [1, "x"], "stop_token_ids must be integers"),
        ("stop", ["ok", 3], "stop strings must be non-empty strings"),
    ],
)
def test_values_the_sampler_cannot_use_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_the_largest_seed_is_usable():
    tokens, failures = Sampler().sample(torch.zeros(1, 5), ["r"], [SamplingParams(seed=2**64 - 1)], [7])
    assert failures == {} and 0 <= tokens[0] < 5

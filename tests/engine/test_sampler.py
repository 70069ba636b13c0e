import torch

from engine.sampler import Sampler, apply_top_k_top_p
from engine.sampling_params import SamplingParams


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0.0)] * 2
    assert Sampler().sample(logits, ["a", "b"], params) == [1, 0]


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
        return [sampler.sample(logits, ["r"], [p])[0] for _ in range(n)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sampling_never_picks_masked_tokens():
    logits = torch.zeros(1, 10)
    p = SamplingParams(temperature=1.0, top_k=3, seed=0)
    logits[0, [2, 5, 7]] = 1.0
    sampler = Sampler()
    picks = {sampler.sample(logits, ["r"], [p])[0] for _ in range(50)}
    assert picks <= {2, 5, 7} and len(picks) > 1

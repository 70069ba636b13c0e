"""Greedy tokens from Tandem's engine equal transformers' generate, token for token."""

import random

import pytest

from engine import LLM, SamplingParams
from tests.checkpoints import hf_greedy

FAMILIES = ["llama", "qwen2", "mistral"]
BLOCK_SIZE = 16
CHUNK = 32  # the prefill token budget: prompts longer than this prefill in chunks


def random_prompts(lengths, seed, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


def assert_matches_hf(model_dir, prompts, outputs, max_tokens, ignore_eos=False):
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = hf_greedy(model_dir, prompt, max_tokens, ignore_eos)
        assert out.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_mixed_lengths_matches_transformers(checkpoints, family):
    # Lengths on and around block boundaries, and longer than one prefill chunk.
    lengths = [1, 5, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE, CHUNK + 7, 3 * CHUNK + 2]
    prompts = random_prompts(lengths, seed=len(family))
    llm = LLM(checkpoints[family], block_size=BLOCK_SIZE, max_num_batched_tokens=CHUNK, max_num_seqs=8)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20))
    assert_matches_hf(checkpoints[family], prompts, outputs, 20)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hits_match_transformers(checkpoints, family):
    shared = random_prompts([3 * BLOCK_SIZE + 5], seed=7)[0]
    tails = random_prompts([4, 11, BLOCK_SIZE], seed=8)
    llm = LLM(checkpoints[family], block_size=BLOCK_SIZE, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    first = llm.generate([shared], params)
    prompts = [shared + t for t in tails] + [shared]
    outputs = llm.generate(prompts, params)
    assert all(o.num_cached_tokens >= 3 * BLOCK_SIZE for o in outputs[:3])
    # Fully cached prompt: all but its last block come from the cache, the answer is unchanged.
    assert outputs[3].num_cached_tokens == 3 * BLOCK_SIZE and outputs[3].token_ids == first[0].token_ids
    assert_matches_hf(checkpoints[family], prompts, outputs, 12)


def test_preemption_under_block_pressure_matches_transformers(checkpoints):
    # 12 blocks of 16 slots hold one 150-token sequence but not six of them at once:
    # sequences are preempted, recomputed, and must still produce the same tokens.
    prompts = random_prompts([40, 45, 50, 55, 60, 65], seed=3)
    llm = LLM(
        checkpoints["llama"],
        block_size=BLOCK_SIZE,
        num_blocks=12,
        max_model_len=192,
        max_num_batched_tokens=64,
        enable_prefix_caching=False,
    )
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert_matches_hf(checkpoints["llama"], prompts, outputs, 40, ignore_eos=True)
    assert llm.engine.block_manager.num_free_blocks == 12


def test_string_prompts_and_text(checkpoints):
    llm = LLM(checkpoints["llama"])
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=8))[0]
    prompt_ids = llm.tokenizer.encode("Once upon a time")
    assert out.prompt_token_ids == prompt_ids
    assert out.token_ids == hf_greedy(checkpoints["llama"], prompt_ids, 8)
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)

"""On a GPU, in float16 and bfloat16: greedy tokens from the engine against transformers on the
same GPU and dtype.

Half precision reorders sums, so two correct implementations may pick different tokens where
the reference's two best logits are nearly tied. The tolerance, stated: the engine's tokens
equal the reference's up to the first position where they differ, and there the reference's
top-two logit gap is at most TIE[dtype] (about 8 units in the last place of a logit near 4
in bfloat16, 16 in float16); after a divergence the continuations are not compared.
"""

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.test_oracle import FAMILIES, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in scripts/gpu_check.sh)")
TIE = {"float16": 0.03, "bfloat16": 0.25}
MAX_TOKENS = 24


def hf_greedy_with_gaps(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """The reference's greedy tokens and, at each, the gap between its two best logits."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    gaps = []
    for scores in out.scores:
        top = torch.topk(scores[0].float(), 2).values
        gaps.append(float(top[0] - top[1]))
    return tokens, gaps


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_on_gpu_matches_transformers_up_to_near_ties(checkpoints, family, dtype):
    from transformers import AutoModelForCausalLM

    model_dir = checkpoints[family]
    prompts = random_prompts([1, 7, 16, 17, 40, 90], seed=3)
    llm = LLM(model_dir, device="cuda", dtype=dtype, block_size=16, max_num_batched_tokens=32, max_num_seqs=8)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to("cuda").eval()
    exact = 0
    for prompt, out in zip(prompts, outputs, strict=True):
        expected, gaps = hf_greedy_with_gaps(reference, prompt)
        diverged = next((i for i, (a, b) in enumerate(zip(out.token_ids, expected, strict=False)) if a != b), None)
        if diverged is None:
            exact += 1
            continue
        assert gaps[diverged] <= TIE[dtype], (
            f"prompt of {len(prompt)} tokens diverged at token {diverged} where the reference's top-two "
            f"logits differ by {gaps[diverged]:.3f} (tolerance {TIE[dtype]} in {dtype})"
        )
    assert exact >= len(prompts) // 2, f"only {exact} of {len(prompts)} prompts matched exactly"
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks

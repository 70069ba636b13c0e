"""Pipeline parallelism: stages of layers, each rank in its own process, Gloo on CPU.

A pp=2 engine (even and uneven layer splits, and pp=2 x tp=2) must produce transformers' greedy
tokens; each rank must cache exactly its stage's layers (and its TP heads) of what one rank
caches (KV transfers move them by those layers); each rank's per-layer hooks must name its own
layers once per step; and the micro-batches must cut steps as split_batch says.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine
from engine.parallel import split_batch, stage_bounds
from engine.scheduler import ScheduledSeq
from tests.checkpoints import hf_greedy, make_checkpoint
from tests.engine.test_oracle import random_prompts
from tests.engine.test_tensor_parallel import CONFIG, MAX_TOKENS, PROMPT_LENGTHS, drive, run_group

NUM_LAYERS = 5


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("pp")
    return make_checkpoint(root / "llama5", "llama", tokenizer_dir, seed=6, num_hidden_layers=NUM_LAYERS)


@pytest.mark.parametrize(
    "tp, pp, layers, bounds",
    [
        (1, 2, None, (0, 3, 5)),
        (1, 2, (1, 4), (0, 1, 5)),
        (2, 2, (4, 1), (0, 4, 5)),
    ],
    ids=["pp2-even", "pp2-uneven", "pp2xtp2"],
)
def test_stages_match_transformers_and_cache_their_layers(tmp_path, deep_checkpoint, tp, pp, layers, bounds):
    model_dir = deep_checkpoint
    prompts = random_prompts(PROMPT_LENGTHS, seed=12)
    config = EngineConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, pipeline_layers=layers, **CONFIG)
    ranks = run_group(tmp_path, model_dir, config, prompts)

    tokens = ranks[0]["tokens"]
    for i, prompt in enumerate(prompts):
        assert tokens[str(i)] == hf_greedy(model_dir, prompt, MAX_TOKENS, ignore_eos=True), f"prompt {i} diverged"

    alone = LLMEngine(model_dir, EngineConfig(**CONFIG))
    assert drive(alone, prompts) == tokens
    full = alone.kv_cache.tensor.cpu()  # [layers, 2, blocks, kv heads, block_size, head_dim]
    for rank, got in enumerate(ranks):
        layout = got["layout"]
        assert (layout.pp_rank, layout.tp_rank, layout.layer_bounds) == (rank // tp, rank % tp, bounds)
        heads = slice(layout.head_offset, layout.head_offset + layout.num_kv_heads)
        want = full[layout.layer_start : layout.layer_end, :, :, heads]
        torch.testing.assert_close(got["cache"], want, rtol=1e-4, atol=1e-5)
        # Every step: the payload, then this rank's layers in order, each once.
        calls = got["calls"]
        steps = [i for i, c in enumerate(calls) if c[0] == "step"]
        own = [("layer", n) for n in layout.layers]
        assert all(calls[i + 1 : i + 1 + len(own)] == own for i in steps), f"rank {rank}"
        assert len(calls) == len(steps) * (1 + len(own))
        assert [c for c in calls if c[0] == "step"] == [c for c in ranks[0]["calls"] if c[0] == "step"]


def test_a_dead_stage_fails_the_driver_fast(tmp_path, deep_checkpoint):
    prompts = random_prompts([40, 9], seed=3)
    config = EngineConfig(pipeline_parallel_size=2, **CONFIG)
    ranks = run_group(tmp_path, deep_checkpoint, config, prompts, die=(1, 2))
    assert ranks[0]["error"] is not None and ranks[0]["tokens"] is None


def test_stage_splits_are_checked(deep_checkpoint):
    assert stage_bounds(5, 2) == (0, 3, 5)
    assert stage_bounds(5, 3, (1, 1, 3)) == (0, 1, 2, 5)
    with pytest.raises(ValueError, match="exceeds the model's num_layers=5"):
        stage_bounds(5, 6)
    with pytest.raises(ValueError, match=r"pipeline_layers \(2, 2\) must .* add up to the model's num_layers=5"):
        LLMEngine(
            deep_checkpoint,
            EngineConfig(pipeline_parallel_size=2, pipeline_layers=(2, 2)),
            rank=0,
            dist_init="tcp://127.0.0.1:1",
        )
    with pytest.raises(ValueError, match="a positive layer count for each of the pipeline_parallel_size=2"):
        EngineConfig(pipeline_parallel_size=2, pipeline_layers=(5,))
    with pytest.raises(ValueError, match="needs dist_init"):
        LLMEngine(deep_checkpoint, EngineConfig(pipeline_parallel_size=2))


@pytest.mark.parametrize(
    "tokens, parts, groups",
    [
        ([1, 1, 1, 1], 2, [[1, 1], [1, 1]]),
        ([1, 1, 1, 30], 2, [[1, 1, 1], [30]]),
        ([30, 1], 4, [[30], [1]]),
        ([1, 1, 1], 3, [[1], [1], [1]]),
        ([5], 2, [[5]]),
    ],
)
def test_micro_batches_are_contiguous_balanced_and_never_empty(tokens, parts, groups):
    items = [ScheduledSeq(seq=None, num_new_tokens=n) for n in tokens]  # type: ignore[arg-type]
    got = split_batch(items, parts)
    assert [[i.num_new_tokens for i in g] for g in got] == groups
    assert [i for g in got for i in g] == items

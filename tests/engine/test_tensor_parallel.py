"""Tensor parallelism: every rank in its own process, Gloo on CPU (NCCL where two GPUs exist).

A TP=2 engine must produce transformers' greedy tokens, leave on each rank exactly that
rank's KV heads of what a TP=1 engine caches (KV transfers reshard by those heads), run the
driver's per-step hooks on every rank, and fail fast instead of hanging when a rank dies.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import EngineConfig, LLMEngine, ModelConfig, SamplingParams
from engine.loader import load_model
from engine.parallel import shard_model
from tests.checkpoints import hf_greedy, make_checkpoint
from tests.engine.test_oracle import random_prompts
from tests.ports import free_port

TP = 2
TIMEOUT_S = 120.0
# Lengths around block boundaries and past one prefill chunk: chunked prefill, mixed batches.
PROMPT_LENGTHS = [5, 16, 17, 39, 70]
MAX_TOKENS = 10
CONFIG = dict(
    dtype="float32", block_size=16, max_num_batched_tokens=32, max_num_seqs=8, num_blocks=64, max_model_len=256
)
GPUS = torch.cuda.device_count()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(GPUS < TP, reason=f"NCCL tensor parallelism needs {TP} GPUs; this machine has {GPUS}"),
    ),
]


def drive(engine: LLMEngine, prompts: list[list[int]], on_step=None, die_after_steps: int | None = None):
    """Rank 0's loop: every step's payload is the prompts it completes with their blocks, as a
    prefill worker's transfers would be. Returns the generated tokens per request id."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens, num_steps = {}, 0
    while engine.has_unfinished():
        if num_steps == die_after_steps:
            os._exit(0)
        out = engine.schedule()
        payload = [
            (s.seq.request_id, list(s.seq.block_ids))
            for s in out.scheduled
            if s.samples and s.seq.num_output_tokens == 0
        ]
        hook = on_step(payload) if on_step is not None else None
        for o in engine.run(out, hook, step_payload=payload):
            if o.finished:
                tokens[o.request_id] = o.token_ids
        num_steps += 1
    return tokens


def run_rank(
    rank: int,
    dist_init: str,
    model_dir,
    config: EngineConfig,
    prompts,
    out_path: str,
    die: tuple[int, int] | None = None,
) -> None:
    """One rank's process. die=(rank, steps): that rank's process exits abruptly after
    `steps` steps; the survivor records the error it got."""
    torch.set_num_threads(1)
    calls: list[tuple] = []  # ("step", payload) and ("layer", i), in the order they ran
    die_after = die[1] if die is not None and die[0] == rank else None

    def on_step(payload):
        if rank and die_after is not None and sum(c[0] == "step" for c in calls) == die_after:
            os._exit(0)
        calls.append(("step", payload))
        return lambda layer_idx: calls.append(("layer", layer_idx))

    engine = LLMEngine(model_dir, config, rank=rank, dist_init=dist_init)
    result = {"tokens": None, "error": None}
    try:
        if rank == 0:
            result["tokens"] = drive(engine, prompts, on_step, die_after)
        else:
            engine.follow(on_step)
    except RuntimeError as exc:
        if die is None:
            raise
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        engine.close()
    result.update(layout=engine.kv_cache.layout, cache=engine.kv_cache.tensor.cpu(), calls=calls)
    torch.save(result, out_path)


def _run_rank_logged(*args, **kwargs) -> None:
    try:
        run_rank(*args, **kwargs)
    except BaseException:
        traceback.print_exc()
        raise


def run_group(tmp_path, model_dir, config: EngineConfig, prompts, die=None) -> list[dict]:
    """Start every rank in its own process and return what each saved."""
    ctx = mp.get_context("spawn")
    dist_init = f"tcp://127.0.0.1:{free_port()}"
    ranks = config.num_ranks
    paths = [str(tmp_path / f"rank{r}.pt") for r in range(ranks)]
    procs = [
        ctx.Process(
            target=_run_rank_logged, args=(r, dist_init, str(model_dir), config, prompts, paths[r]), kwargs={"die": die}
        )
        for r in range(ranks)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
    assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"
    survivors = [r for r in range(ranks) if die is None or r != die[0]]
    return [torch.load(paths[r], weights_only=False) if r in survivors else None for r in range(ranks)]


def randomize_biases(model_dir, seed: int):
    """Transformers initialises biases to zero, which would hide a bias added on every rank."""
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if name.endswith(".bias"):
            weights[name] = 0.1 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
    save_file(weights, path, metadata={"format": "pt"})
    return model_dir


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory, tokenizer_dir):
    # Llama: GQA (4 query heads on 2 KV heads), untied LM head, and biases on every projection,
    # so that the row-parallel ones (o_proj, down_proj) must add theirs exactly once.
    # Qwen2: q/k/v biases only, tied embeddings.
    root = tmp_path_factory.mktemp("tp")
    llama = make_checkpoint(root / "llama", "llama", tokenizer_dir, seed=4, attention_bias=True, mlp_bias=True)
    qwen2 = make_checkpoint(root / "qwen2", "qwen2", tokenizer_dir, seed=5, tie_word_embeddings=True)
    return {"llama": randomize_biases(llama, 4), "qwen2": randomize_biases(qwen2, 5)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tp2_matches_transformers_and_each_rank_caches_its_heads(tmp_path, tp_checkpoints, family, device):
    model_dir = tp_checkpoints[family]
    prompts = random_prompts(PROMPT_LENGTHS, seed=11)
    config = EngineConfig(device=device, tensor_parallel_size=TP, **CONFIG)
    ranks = run_group(tmp_path, model_dir, config, prompts)

    tokens = ranks[0]["tokens"]
    for i, prompt in enumerate(prompts):
        assert tokens[str(i)] == hf_greedy(model_dir, prompt, MAX_TOKENS, ignore_eos=True), f"prompt {i} diverged"

    # The same requests on one rank fill the same blocks: rank r must hold its heads of them.
    alone = LLMEngine(model_dir, EngineConfig(device=device, **CONFIG))
    assert drive(alone, prompts) == tokens
    full = alone.kv_cache.tensor.cpu()  # [layers, 2, blocks, kv heads, block_size, head_dim]
    num_kv_heads = alone.model_config.num_kv_heads
    for rank, got in enumerate(ranks):
        layout = got["layout"]
        assert (layout.tp_rank, layout.tp_size, layout.num_kv_heads) == (rank, TP, num_kv_heads // TP)
        heads = slice(layout.head_offset, layout.head_offset + layout.num_kv_heads)
        torch.testing.assert_close(got["cache"], full[:, :, :, heads], rtol=1e-4, atol=1e-5)

    # Every rank ran every step's hooks: the step's payload, then each layer in order.
    num_layers = alone.model_config.num_layers
    calls = ranks[0]["calls"]
    assert calls == ranks[1]["calls"]
    steps = [i for i, c in enumerate(calls) if c[0] == "step"]
    assert all(calls[i + 1 : i + 1 + num_layers] == [("layer", n) for n in range(num_layers)] for i in steps)
    assert len(calls) == len(steps) * (1 + num_layers)
    completed = sorted(rid for i in steps for rid, _ in calls[i][1])
    assert completed == sorted(str(i) for i in range(len(prompts)))


@pytest.mark.parametrize("dead_rank", [0, 1])
def test_a_dead_rank_fails_the_other_fast(tmp_path, checkpoints, dead_rank):
    # The driver dying leaves its follower waiting for a step; a follower dying leaves the
    # driver in an all-reduce. Either way the survivor gets an error, well before any timeout.
    prompts = random_prompts([40, 9], seed=3)
    config = EngineConfig(tensor_parallel_size=TP, **CONFIG)
    start = time.monotonic()
    ranks = run_group(tmp_path, checkpoints["llama"], config, prompts, die=(dead_rank, 2))
    survivor = ranks[1 - dead_rank]
    assert survivor["error"] is not None and survivor["tokens"] is None
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("tp, field", [(3, "num_heads=4"), (4, "num_kv_heads=2")])
def test_tp_size_must_divide_the_heads(checkpoints, tp, field):
    # Checked before any process group is formed, so no rank ever waits for the others.
    message = f"tensor_parallel_size={tp} does not divide the model's {field}"
    with pytest.raises(ValueError, match=message):
        LLMEngine(checkpoints["llama"], EngineConfig(tensor_parallel_size=tp), rank=0, dist_init="tcp://127.0.0.1:1")
    model = load_model(checkpoints["llama"], ModelConfig.from_dir(checkpoints["llama"]), torch.float32, "cpu", 64)
    with pytest.raises(ValueError, match=message):
        shard_model(model, 0, tp)


def test_tp_arguments_are_checked(checkpoints):
    with pytest.raises(ValueError, match="tensor_parallel_size must be positive"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="needs dist_init"):
        LLMEngine(checkpoints["llama"], EngineConfig(tensor_parallel_size=2), rank=1)
    with pytest.raises(ValueError, match=r"x pipeline_parallel_size=2\), got 2"):
        LLMEngine(checkpoints["llama"], EngineConfig(tensor_parallel_size=2), rank=2, dist_init="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"x pipeline_parallel_size=1\), got 1"):
        LLMEngine(checkpoints["llama"], rank=1)
    alone = LLMEngine(checkpoints["llama"])
    with pytest.raises(RuntimeError, match="runs alone"):
        alone.follow()
    alone.close()  # nothing to leave

"""Engine throughput and decode-step overhead, Tandem beside transformers, in one run.

    .venv/bin/python -m benchmarks.engine_throughput [--trace PATH/conv.csv]

(a) 64 requests with prompt and output lengths sampled from an Azure conversation trace
    (scaled down to fit the model): Tandem's continuous batching vs transformers
    `generate` in static batches of 16 (arrival order, left padding, each batch runs to
    its longest output). Both count only the tokens each request asked for.
(b) Tandem's decode step at batch 1 (schedule + run + sample) vs a bare forward of the same
    shape: our model called directly on prepared inputs, and transformers' model with its
    KV cache; and vs the memory-bandwidth roofline (weight bytes / measured copy bandwidth).
The model is a ~100M-parameter Llama-shaped checkpoint with random weights, float32.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DEFAULT_TRACE_DIR, markdown_table, median_time_s, read_trace

ARCH: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
NUM_REQUESTS = 64
HF_BATCH = 16
PROMPT_SCALE, MAX_PROMPT = 1 / 8, 512
OUTPUT_SCALE, MAX_OUTPUT = 1 / 4, 128


def build_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**ARCH, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def workload(trace: Path, seed: int = 0) -> list[tuple[list[int], int]]:
    rows = read_trace(trace)
    rng = random.Random(seed)
    start = rng.randrange(len(rows) - NUM_REQUESTS)
    requests = []
    for prompt_len, output_len in rows[start : start + NUM_REQUESTS]:
        n_in = max(4, min(MAX_PROMPT, round(prompt_len * PROMPT_SCALE)))
        n_out = max(1, min(MAX_OUTPUT, round(output_len * OUTPUT_SCALE)))
        requests.append(([rng.randrange(3, ARCH["vocab_size"]) for _ in range(n_in)], n_out))
    return requests


def run_tandem(model_dir: Path, requests) -> float:
    from engine import LLM, SamplingParams

    llm = LLM(
        model_dir,
        dtype="float32",
        max_num_seqs=NUM_REQUESTS,
        max_num_batched_tokens=512,
        max_model_len=MAX_PROMPT + MAX_OUTPUT + 16,
    )
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate([requests[0][0]], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outputs] == [n for _, n in requests]
    return elapsed


def run_transformers(model_dir: Path, requests) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.update(do_sample=False, pad_token_id=0)
    gen_config.eos_token_id = None  # run every row to the batch's length, like ignore_eos
    start = time.perf_counter()
    for i in range(0, len(requests), HF_BATCH):
        batch = requests[i : i + HF_BATCH]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(batch):  # left padding
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        gen_config.max_new_tokens = max(n for _, n in batch)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, generation_config=gen_config)
    return time.perf_counter() - start


def decode_step_times(model_dir: Path, context: int = 128, repeats: int = 30) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, DynamicCache

    from engine import LLMEngine, SamplingParams
    from engine.config import EngineConfig

    engine = LLMEngine(model_dir, EngineConfig(dtype="float32", max_num_seqs=1, max_model_len=1024))
    engine.add_request(
        "r", list(range(3, 3 + context)), SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    )
    engine.step()  # prefill
    step_s = median_time_s(engine.step, repeats)

    # The same decode through our model with inputs prepared once: no scheduling, no sampling.
    out = engine.scheduler.schedule()
    ids, pos, meta, sample_indices = engine.runner.prepare(out.scheduled)

    def bare():
        with torch.inference_mode():
            hidden = engine.model(ids, pos, meta, engine.kv_cache)
            return engine.model.compute_logits(hidden[sample_indices])

    bare_s = median_time_s(bare, repeats)

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        prompt = torch.arange(3, 3 + context)[None]
        cache = DynamicCache(config=hf.config)
        hf(prompt, past_key_values=cache, use_cache=True)
        token = torch.tensor([[5]])

        def hf_step():
            hf(token, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[context]]))
            cache.crop(-1)  # drop the new token: every repeat sees the same context

        hf_s = median_time_s(hf_step, repeats)

    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    src = torch.empty(weight_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = median_time_s(lambda: dst.copy_(src), 5)
    bandwidth = 2 * weight_bytes / copy_s  # a copy reads and writes every byte
    return {
        "step_s": step_s,
        "bare_s": bare_s,
        "hf_s": hf_s,
        "roofline_s": weight_bytes / bandwidth,
        "weight_bytes": weight_bytes,
        "bandwidth": bandwidth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE_DIR / "conv.csv")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "llama-100m")
        requests = workload(args.trace)
        out_tokens = sum(n for _, n in requests)
        print(
            f"workload: {len(requests)} requests, prompt tokens {sum(len(p) for p, _ in requests)}, "
            f"output tokens {out_tokens} (from {args.trace.name}); {torch.get_num_threads()} threads",
            flush=True,
        )
        print("(a) running Tandem ...", flush=True)
        tandem_s = run_tandem(model_dir, requests)
        print(f"    {tandem_s:.1f}s; running transformers static batches of {HF_BATCH} ...", flush=True)
        hf_s = run_transformers(model_dir, requests)
        print(f"    {hf_s:.1f}s\n(b) decode step at batch 1 ...", flush=True)
        d = decode_step_times(model_dir)

    print("\n(a) throughput, 64 mixed requests\n")
    print(
        markdown_table(
            ["system", "wall time (s)", "output tokens/s", "ratio"],
            [
                ["transformers generate, static batches of 16", f"{hf_s:.1f}", f"{out_tokens / hf_s:.1f}", "1.00x"],
                [
                    "Tandem engine, continuous batching",
                    f"{tandem_s:.1f}",
                    f"{out_tokens / tandem_s:.1f}",
                    f"{hf_s / tandem_s:.2f}x",
                ],
            ],
        )
    )
    print("\n(b) decode step at batch 1, context 128 (medians of 30)\n")
    print(
        markdown_table(
            ["what", "time (ms)", "Tandem step / this"],
            [
                ["Tandem engine step (schedule + forward + sample)", f"{d['step_s'] * 1e3:.2f}", "1.00x"],
                [
                    "bare forward, Tandem model, prepared inputs",
                    f"{d['bare_s'] * 1e3:.2f}",
                    f"{d['step_s'] / d['bare_s']:.2f}x",
                ],
                [
                    "bare forward, transformers model + DynamicCache",
                    f"{d['hf_s'] * 1e3:.2f}",
                    f"{d['step_s'] / d['hf_s']:.2f}x",
                ],
                [
                    f"roofline: {d['weight_bytes'] / 2**20:.0f} MiB weights / {d['bandwidth'] / 2**30:.1f} GiB/s copy",
                    f"{d['roofline_s'] * 1e3:.2f}",
                    f"{d['step_s'] / d['roofline_s']:.2f}x",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()

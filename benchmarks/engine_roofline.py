"""The engine's step times against the device's own rooflines, measured in the same run.

    python -m benchmarks.engine_roofline --shape llama-3-8b --out report.json   # on a GPU
    python -m benchmarks.engine_roofline --shape tiny --out report.json         # plumbing, CPU

The model has random weights of the named shape (EngineConfig.load_format "dummy"), built on
the device. The rooflines come from this device, in this run:
- bandwidth: a device-to-device copy of a 1 GiB buffer (bytes read + bytes written over time);
- compute: a large square matmul in the model's dtype (2 n^3 FLOPs over time).
Decode: the step time at batch B, every sequence at context K, against
(weight bytes + KV bytes read) / bandwidth. Prefill: one prompt of T tokens in one step,
against (2 x parameters x T + causal attention FLOPs) / compute. A ratio is roofline time over
measured time: 1.0 is the roofline; the targets (issue 12) are decode >= 0.6 at batch 1 and
prefill >= 0.5 at 2,048 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import median_time_s
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine

SHAPES = {
    # Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
    "llama-3-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192 + 512,
    },
    # the same structure, small enough for a CPU: checks the plumbing, not the speed
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
    },
}
PLANS = {  # decode batches, decode context, prefill lengths
    "llama-3-8b": ((1, 16, 64, 256), 512, (512, 2048, 8192)),
    "tiny": ((1, 4), 32, (32, 128)),
}


def log(message: str) -> None:
    print(f"[engine_roofline] {message}", file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over repeats runs, after one warm-up, each waiting for the device."""

    def run_and_wait() -> None:
        fn()
        synchronize(device)

    return median_time_s(run_and_wait, repeats, warmup=1)


def bandwidth_bytes_s(device: str, num_bytes: int, repeats: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * num_bytes / seconds  # read + write


def matmul_flop_s(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds


def write_model(directory: Path, shape: dict) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", **shape}
    (directory / "config.json").write_text(json.dumps(config))


def decode_step_s(engine: LLMEngine, batch: int, context: int, steps: int) -> float:
    """Median time of a decode step with `batch` sequences at about `context` tokens each."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", [(7 * i + j) % 97 + 1 for j in range(context)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in _sequences(engine)):
        engine.step()  # prefill every prompt (chunked as the budget allows)
    engine.step()  # the first decode step, untimed
    times = []
    for _ in range(steps):
        synchronize(engine.device)
        start = time.perf_counter()
        engine.step()
        synchronize(engine.device)
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times)


def prefill_s(engine: LLMEngine, tokens: int, repeats: int) -> float:
    """Median time of one step that prefills a prompt of `tokens` tokens (prefix cache off)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for r in range(repeats + 1):
        engine.add_request(f"p{tokens}-{r}", [(11 * j + r) % 89 + 1 for j in range(tokens)], params)
        synchronize(engine.device)
        start = time.perf_counter()
        engine.step()
        synchronize(engine.device)
        if r:  # the first is a warm-up
            times.append(time.perf_counter() - start)
        while engine.has_unfinished():
            engine.step()
    return statistics.median(times)


def _sequences(engine: LLMEngine):
    return [req.seq for req in engine.requests.values()]


def run(shape_name: str, device: str, dtype_name: str, repeats: int) -> dict:
    shape = SHAPES[shape_name]
    batches, context, prompt_lengths = PLANS[shape_name]
    dtype = getattr(torch, dtype_name)
    log(f"device {device}, dtype {dtype_name}: measuring bandwidth and matmul peaks")
    bandwidth = bandwidth_bytes_s(device, (1 << 30) if device.startswith("cuda") else (64 << 20), repeats)
    flops = matmul_flop_s(device, dtype, 8192 if device.startswith("cuda") else 512, repeats)
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {flops / 1e12:.2f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), shape)
        log(f"building the {shape_name} model with random weights")
        config = EngineConfig(
            dtype=dtype_name,
            device=device,
            load_format="dummy",
            enable_prefix_caching=False,
            max_num_seqs=max(batches),
            max_num_batched_tokens=max(prompt_lengths),
            max_model_len=max(prompt_lengths) + 64,
        )
        engine = LLMEngine(tmp, config)
    num_params = sum(p.numel() for p in engine.model.parameters())
    element = torch.finfo(dtype).bits // 8
    weight_bytes = num_params * element
    kv_bytes_per_token = engine.kv_cache.layout.bytes_per_token
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    decode = []
    for batch in batches:
        log(f"decode: batch {batch}, context {context}")
        measured = decode_step_s(engine, batch, context, steps=max(repeats, 5))
        roofline = (weight_bytes + batch * context * kv_bytes_per_token) / bandwidth
        decode.append(
            {
                "batch": batch,
                "context": context,
                "step_ms": measured * 1e3,
                "roofline_ms": roofline * 1e3,
                "ratio": roofline / measured,
            }
        )
    prefill = []
    for tokens in prompt_lengths:
        log(f"prefill: {tokens} tokens")
        measured = prefill_s(engine, tokens, repeats)
        work = 2 * num_params * tokens + 2 * layers * h * tokens * tokens  # GEMMs + causal QK^T and PV
        roofline = work / flops
        prefill.append(
            {
                "tokens": tokens,
                "step_ms": measured * 1e3,
                "roofline_ms": roofline * 1e3,
                "tflop_s": work / measured / 1e12,
                "ratio": roofline / measured,
            }
        )
    engine.close()
    return {
        "shape": shape_name,
        "device": device,
        "device_name": _device_name(device),
        "dtype": dtype_name,
        "num_params": num_params,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "matmul_tflop_s": flops / 1e12,
        "decode": decode,
        "prefill": prefill,
        "targets": {"decode_batch1_ratio": 0.6, "prefill_2048_ratio": 0.5},
    }


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def table(report: dict) -> str:
    lines = [
        f"{report['shape']} on {report['device_name']} ({report['dtype']}): copy "
        f"{report['copy_bandwidth_gb_s']:.0f} GB/s, matmul {report['matmul_tflop_s']:.1f} TFLOP/s",
        "| decode batch | context | step ms | roofline ms | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {d['batch']} | {d['context']} | {d['step_ms']:.2f} | {d['roofline_ms']:.2f} | {d['ratio']:.2f} |"
        for d in report["decode"]
    ]
    lines += ["", "| prefill tokens | step ms | roofline ms | TFLOP/s | ratio |", "|---|---|---|---|---|"]
    lines += [
        f"| {p['tokens']} | {p['step_ms']:.1f} | {p['roofline_ms']:.1f} | {p['tflop_s']:.1f} | {p['ratio']:.2f} |"
        for p in report["prefill"]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the report (JSON) here")
    args = parser.parse_args(argv)
    report = run(args.shape, args.device, args.dtype, args.repeats)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

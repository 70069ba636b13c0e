"""What a CPU worker's core does not own: how two workers on this machine's cores slow each other.

    .venv/bin/python -m benchmarks.cpu_neighbours [--out docs/bench/cpu-neighbours]

The closed loop (benchmarks/closed_loop.py) plans a prefill and a decode worker on a core
each, with a profile taken on one core while the other sat idle, and serves slower than it
planned. This measures the three things that could make a core's step slower while serving
than alone, each on core 1 with core 0 idle and then busy, alternated:

1. compute: a 512x512 fp32 matmul, which lives in the core's own caches (do the two cores
   share execution units, as hyperthreads of one physical core would?);
2. small GEMMs with weights from memory: a [M, 768] x [768, 2048] fp32 GEMM cycling through
   48 weight matrices (300 MB, more than the L3), M = 1..16, the decode step's shape, with
   torch's default (MKL) and oneDNN linear, alone;
3. the engine's decode step: the ~100M Llama of benchmarks/distserve.py on core 1, batches of
   1..16 sequences of 128 tokens, while core 0 sits idle or runs the same engine prefilling
   256-token prompts back to back (a prefill worker beside a decode worker).

It prints a table per part and writes results.json; medians of --repeats alternations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import markdown_table

BUSY_CORE, TIMED_CORE = 0, 1
DECODE_BATCHES = (1, 2, 3, 4, 8, 16)
GEMM_ROWS = (1, 2, 3, 4, 8, 16)


def _pin(core: int) -> None:
    import torch

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _per_call_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def neighbour(kind: str, model: str) -> None:
    """Run on BUSY_CORE until killed: matmuls, or the engine prefilling prompts."""
    import torch

    _pin(BUSY_CORE)
    if kind == "matmul":
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        while True:
            a @ b
    from engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(model, EngineConfig(dtype="float32", device="cpu", max_model_len=600))
    for k in range(10**9):
        engine.add_request(str(k), list(range(2, 258)), SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()


class Beside:
    """A neighbour process on BUSY_CORE for the duration of a with block (None: none)."""

    def __init__(self, kind: str | None, model: str):
        self.kind, self.model, self.proc = kind, model, None

    def __enter__(self):
        if self.kind is not None:
            argv = [sys.executable, "-m", "benchmarks.cpu_neighbours", "--neighbour", self.kind, "--model", self.model]
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(8.0 if self.kind == "prefill" else 1.0)  # the engine loads its weights first
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def compute_part(repeats: int, model: str) -> list[dict]:
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    rows = []
    for _ in range(repeats):
        for kind in (None, "matmul"):
            with Beside(kind, model):
                rows.append({"neighbour": kind or "idle", "us": _per_call_us(lambda: a @ b, 400)})
    return rows


def gemm_part(repeats: int) -> list[dict]:
    import torch
    from torch.utils import mkldnn

    weights = [torch.randn(2048, 768) for _ in range(48)]
    layers = []
    for w in weights:
        layer = torch.nn.Linear(768, 2048, bias=False)
        layer.weight.data = w
        layers.append(mkldnn.to_mkldnn(layer))

    def cycling(call, x):
        """A call on the next weight matrix each time: none is in a cache when its turn comes."""
        turn = iter(range(10**12))
        return lambda: call(next(turn) % len(weights), x)

    rows = []
    for _ in range(repeats):
        for m in GEMM_ROWS:
            x = torch.randn(m, 768)
            mkl = cycling(lambda k, x: torch.nn.functional.linear(x, weights[k]), x)
            dnn = cycling(lambda k, x: layers[k](x), x.to_mkldnn())
            rows.append({"rows": m, "mkl_us": _per_call_us(mkl, 200), "onednn_us": _per_call_us(dnn, 200)})
    return rows


def decode_part(repeats: int, model: str) -> list[dict]:
    import numpy as np

    from engine import EngineConfig, LLMEngine
    from planner.latency.profile import measure_decode

    engine = LLMEngine(
        model,
        EngineConfig(
            dtype="float32",
            device="cpu",
            max_num_seqs=max(DECODE_BATCHES),
            max_num_batched_tokens=512,
            max_model_len=300,
            enable_prefix_caching=False,
        ),
    )
    rng = np.random.default_rng(0)
    measure_decode(engine, (1, 4), (128,), 1, rng)  # warm-up
    rows = []
    for _ in range(repeats):
        for kind in (None, "prefill"):
            with Beside(kind, model):
                points = measure_decode(engine, DECODE_BATCHES, (128,), 1, rng)
            for batch in DECODE_BATCHES:
                ms = statistics.median(p[2] for p in points if p[0] == batch)
                rows.append({"neighbour": kind or "idle", "batch": batch, "ms": ms})
    return rows


def _median(records: list[dict], key: str, **match) -> float:
    return statistics.median(r[key] for r in records if all(r[k] == v for k, v in match.items()))


def tables(results: dict) -> str:
    compute = results["compute"]
    idle, busy = _median(compute, "us", neighbour="idle"), _median(compute, "us", neighbour="matmul")
    parts = [
        "compute: a 512x512 fp32 matmul on core 1\n\n"
        + markdown_table(
            ["core 0", "us per matmul", "vs idle"],
            [["idle", f"{idle:.0f}", "1.00x"], ["matmuls", f"{busy:.0f}", f"{busy / idle:.2f}x"]],
        )
    ]
    gemm = results["gemm"]
    one = _median(gemm, "mkl_us", rows=1)
    parts.append(
        "[M, 768] x [768, 2048] fp32, weights from memory, core 1 alone\n\n"
        + markdown_table(
            ["M (rows)", "MKL us", "MKL vs M=1", "oneDNN us"],
            [
                [
                    str(m),
                    f"{_median(gemm, 'mkl_us', rows=m):.0f}",
                    f"{_median(gemm, 'mkl_us', rows=m) / one:.2f}x",
                    f"{_median(gemm, 'onednn_us', rows=m):.0f}",
                ]
                for m in GEMM_ROWS
            ],
        )
    )
    decode = results["decode"]
    rows = []
    for batch in DECODE_BATCHES:
        alone = _median(decode, "ms", neighbour="idle", batch=batch)
        beside = _median(decode, "ms", neighbour="prefill", batch=batch)
        rows.append([str(batch), f"{alone:.1f}", f"{beside:.1f}", f"{beside / alone:.2f}x"])
    parts.append(
        "the engine's decode step on core 1 (~100M Llama, 128-token contexts)\n\n"
        + markdown_table(["batch", "core 0 idle (ms)", "core 0 prefilling (ms)", "slowdown"], rows)
    )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench/cpu-neighbours"))
    parser.add_argument("--repeats", type=int, default=3, help="alternations of idle and busy (default 3)")
    parser.add_argument("--model", help="checkpoint (default: the ~100M Llama of benchmarks/distserve.py)")
    parser.add_argument("--neighbour", choices=("matmul", "prefill"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        from benchmarks.distserve import model_dir

        args.model = str(model_dir())
    if args.neighbour is not None:
        neighbour(args.neighbour, args.model)
        return
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two cores: one timed, one for the neighbour")
    load_before = os.getloadavg()[0]
    _pin(TIMED_CORE)
    results: dict = {"load_avg_before": load_before}
    for name, part in (
        ("compute", lambda: compute_part(args.repeats, args.model)),
        ("gemm", lambda: gemm_part(args.repeats)),
        ("decode", lambda: decode_part(args.repeats, args.model)),
    ):
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        results[name] = part()
    results["load_avg_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = tables(results)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"load average {results['load_avg_before']:.2f} before, {results['load_avg_after']:.2f} after")


if __name__ == "__main__":
    main()

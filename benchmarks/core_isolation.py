"""Why engine throughput collapses when other work shares the cores, and what fixes it.

The engine runs a fixed offline workload (the ~100M Llama and the 32 first requests of the
mixed trace workload of benchmarks/engine_throughput.py) in worker processes, each started
with the thread settings of one setup:

  default       torch's defaults: a thread per core of the machine, OpenMP threads spin
                after each parallel region (what a worker got before engine/cores.py)
  owned cores   engine/cores.py: the process bound to its own cores, as many threads, idle
                threads sleep (OMP_WAIT_POLICY=PASSIVE)

in three situations: the worker alone, the worker beside another job (a busy loop, not
pinned, as any other process on the machine), and two workers side by side (as a prefill and
a decode worker on one machine). Setups alternate within each repeat; medians of --repeats.

    .venv/bin/python -m benchmarks.core_isolation [--repeats 3] [--trace PATH/conv.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_TRACE_DIR, markdown_table

NUM_REQUESTS = 32


def _worker(model_dir: str, trace: str, cores: list[int] | None) -> None:
    """Child: bind (owned cores), run the workload, print output tokens/s as JSON."""
    from benchmarks.engine_throughput import MAX_OUTPUT, MAX_PROMPT, workload
    from engine import LLM, SamplingParams
    from engine.cores import bind_cores

    if cores:
        bind_cores(cores)
    requests = workload(Path(trace))[:NUM_REQUESTS]
    llm = LLM(
        model_dir,
        dtype="float32",
        max_num_seqs=NUM_REQUESTS,
        max_num_batched_tokens=512,
        max_model_len=MAX_PROMPT + MAX_OUTPUT + 16,
    )
    llm.generate([requests[0][0]], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    print(json.dumps({"tok_s": sum(n for _, n in requests) / elapsed}), flush=True)


def _spawn(model_dir: Path, trace: Path, owned: list[int] | None) -> subprocess.Popen:
    from engine.cores import thread_env

    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME"):
        env.pop(name, None)
    if owned:
        env.update(thread_env(len(owned)))
    code = f"from benchmarks.core_isolation import _worker; _worker({str(model_dir)!r}, {str(trace)!r}, {owned!r})"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def _busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(model_dir: Path, trace: Path, situation: str, setup: str, cores: list[int]) -> list[float]:
    """Output tokens/s of each worker in one run."""
    if situation == "pair":
        owned = [[cores[0]], [cores[1]]] if setup == "owned" else [None, None]
    else:
        owned = [cores[:1]] if setup == "owned" else [None]
    hog = _busy_loop() if situation == "beside a busy loop" else None
    try:
        workers = [_spawn(model_dir, trace, o) for o in owned]
        return [json.loads(w.communicate(timeout=1800)[0].strip().splitlines()[-1])["tok_s"] for w in workers]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE_DIR / "conv.csv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/core_isolation.json"))
    args = parser.parse_args()
    from benchmarks.engine_throughput import build_model
    from engine.cores import available_cores

    cores = available_cores()
    if len(cores) < 2:
        raise SystemExit("needs at least 2 cores")
    situations = ("alone", "beside a busy loop", "pair")
    results: dict[tuple[str, str], list[float]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "llama-100m")
        for repeat in range(args.repeats):
            for situation in situations:
                for setup in ("default", "owned") if repeat % 2 == 0 else ("owned", "default"):
                    loads.append(os.getloadavg()[0])
                    tok_s = run(model_dir, args.trace, situation, setup, cores)
                    results.setdefault((situation, setup), []).extend(tok_s)
                    print(
                        f"  repeat {repeat + 1}: {situation:19s} {setup:8s} "
                        + ", ".join(f"{t:.1f}" for t in tok_s)
                        + " tok/s per worker",
                        flush=True,
                    )
    base = statistics.median(results[("alone", "default")])
    rows = []
    for situation in situations:
        for setup in ("default", "owned"):
            med = statistics.median(results[(situation, setup)])
            rows.append(
                [
                    situation,
                    {"default": "torch defaults", "owned": "owned cores"}[setup],
                    f"{med:.1f}",
                    f"{med / base:.2f}x",
                ]
            )
    print(
        f"\nper-worker output tokens/s, medians of {args.repeats} (machine: {len(cores)} cores; "
        f"load average before runs {min(loads):.2f}-{max(loads):.2f})\n"
    )
    print(markdown_table(["situation", "threads", "tok/s per worker", "vs alone, defaults"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({f"{s}/{t}": v for (s, t), v in results.items()} | {"load_avg": loads}, indent=1))


if __name__ == "__main__":
    main()

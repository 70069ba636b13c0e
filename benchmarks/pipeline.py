"""Pipeline stages against one core and against tensor parallelism, on the same cores.

    .venv/bin/python -m benchmarks.pipeline [--rounds 2] [--requests 16] [--out docs/bench/pipeline]

One engine, four ways, in alternating rounds (the machine is shared: rounds alternate the
setups, and the table gives medians with the load average):

    pp1-1core   one rank on core 0, 1 thread             (the baseline)
    pp1-2cores  one rank on cores 0-1, 2 threads          (the same cores, no parallelism code)
    pp2         two stages, a rank per core, 1 thread each (layers split 6 | 6)
    tp2         two tensor-parallel ranks, a rank per core

The workload is offline: `--requests` prompts of 128 tokens, each generating 32 tokens, all
queued at once, greedy. Reported: wall time, output tokens/s, and the median decode step
(a step that only decodes: the TPOT of a full batch). Beside them, what the planner's step
model (planner/latency/roofline.py step_tokens_ms) gives pp=2 against one device for a
compute-bound batch: the engine runs one step at a time, cut into m = pp micro-batches that
fill the stages in turn, so a step takes (m + pp - 1) / (m pp) of one device's, before the
sends and fixed costs. The model is the ~100M Llama of benchmarks/engine_throughput.py,
random weights, float32.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_results
from benchmarks.engine_throughput import build_model

PROMPT_TOKENS, OUTPUT_TOKENS = 128, 32
SETUPS = {
    # name: (tp, pp, cores of each rank)
    "pp1-1core": (1, 1, [[0]]),
    "pp1-2cores": (1, 1, [[0, 1]]),
    "pp2": (1, 2, [[0], [1]]),
    "tp2": (2, 1, [[0], [1]]),
}


def pipelined_speedup(pp: int, microbatches: int) -> float:
    """One device's step time over a pipelined step's, compute-bound and free of overheads."""
    return microbatches * pp / (microbatches + pp - 1)


def rank_main(model_dir: str, tp: int, pp: int, rank: int, cores: list[int], dist_init: str, requests: int, conn):
    from engine import EngineConfig, LLMEngine, SamplingParams
    from engine.cores import bind_cores

    bind_cores(cores)
    config = EngineConfig(
        dtype="float32",
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_num_seqs=requests,
        max_num_batched_tokens=512,
        max_model_len=PROMPT_TOKENS + OUTPUT_TOKENS + 16,
        num_blocks=requests * 12,
    )
    engine = LLMEngine(model_dir, config, rank=rank, dist_init=dist_init if tp * pp > 1 else None)
    try:
        if rank:
            engine.follow()
            return
        params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
        engine.add_request("warm", list(range(3, 3 + PROMPT_TOKENS)), SamplingParams(max_tokens=2))
        while engine.has_unfinished():
            engine.step()
        for i in range(requests):
            engine.add_request(str(i), [3 + (7 * i + j) % 31000 for j in range(PROMPT_TOKENS)], params)
        decode_steps = []
        start = time.perf_counter()
        while engine.has_unfinished():
            out = engine.schedule()
            only_decodes = all(s.num_new_tokens == 1 and s.seq.num_output_tokens > 0 for s in out.scheduled)
            t0 = time.perf_counter()
            engine.run(out)
            if only_decodes and out.scheduled:
                decode_steps.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        conn.send({"wall_s": wall, "decode_step_ms": 1e3 * statistics.median(decode_steps)})
    finally:
        engine.close()


def run_setup(model_dir: Path, name: str, requests: int) -> dict:
    tp, pp, cores = SETUPS[name]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with socket.socket() as s:  # a free port for the ranks to meet at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist_init = f"tcp://127.0.0.1:{port}"
    procs = [
        ctx.Process(target=rank_main, args=(str(model_dir), tp, pp, r, cores[r], dist_init, requests, child))
        for r in range(tp * pp)
    ]
    for p in procs:
        p.start()
    result = parent.recv()
    for p in procs:
        p.join(120)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--out", default=None, help="folder for results.json and table.md")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("this benchmark needs 2 cores")
    results: dict[str, list[dict]] = {name: [] for name in SETUPS}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        print("building the ~100M model ...", flush=True)
        model_dir = build_model(Path(tmp) / "model")
        for r in range(args.rounds):
            order = list(SETUPS) if r % 2 == 0 else list(reversed(SETUPS))
            for name in order:
                res = run_setup(model_dir, name, args.requests)
                results[name].append(res)
                load.append(os.getloadavg()[0])
                print(f"round {r + 1}/{args.rounds} {name}: {res}", flush=True)
    base = statistics.median(x["wall_s"] for x in results["pp1-1core"])
    tokens = args.requests * OUTPUT_TOKENS
    rows, summary = [], {}
    for name, runs in results.items():
        wall = statistics.median(x["wall_s"] for x in runs)
        step = statistics.median(x["decode_step_ms"] for x in runs)
        forecast = {"pp2": f"{pipelined_speedup(2, 2):.2f}x", "pp1-1core": "1.00x"}.get(name, "")
        summary[name] = {"wall_s": wall, "tokens_per_s": tokens / wall, "decode_step_ms": step, "runs": runs}
        rows.append([name, f"{wall:.2f}", f"{tokens / wall:.1f}", f"{step:.1f}", f"{base / wall:.2f}x", forecast])
    table = markdown_table(
        ["setup", "wall s", "output tok/s", "decode step ms", "speed-up vs 1 core", "planner's pp model"], rows
    )
    table += (
        f"\n\nload average (1 min) during the runs: {min(load):.2f}-{max(load):.2f}; medians of {args.rounds} rounds\n"
    )
    print(table)
    write_results(args.out, {"setups": summary, "load_avg": load, "requests": args.requests}, table)


if __name__ == "__main__":
    main()

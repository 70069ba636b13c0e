"""DistServe's experiment on CPU cores: disaggregated against colocated serving, same cores.

Every setup runs on the same two cores, with one core per worker (engine/cores.py), behind the
same router on Ray, under the same trace-derived workload (Azure conversation lengths, scaled
to the model; Poisson arrivals) at each rate of a sweep:

  disaggregated            1 prefill worker (1 core) + 1 decode worker (1 core), every prompt moved
  disaggregated, local<=T  the same, prompts with at most T uncached tokens prefill on decode
                           (conditional disaggregation)
  colocated 2x1            2 workers of 1 core, each doing prefill and decode (data parallel)
  colocated 1x2            1 worker of 2 cores doing both

The model is a ~100M-parameter Llama (benchmarks/engine_throughput.py's): on one core its
prefill of a few hundred tokens takes as long as dozens of decode steps, so a prefill that
joins a running decode batch stalls it (the interference disaggregation removes). The
embedded 1.7M model computes too little per token for that to show.

Per-request TTFT and TPOT are kept, so SLO attainment is computed afterwards for several SLOs
from the same runs: SLO targets are multiples of what one request alone sees (its TTFT with a
P90 prompt, its TPOT, on one core), tight on one metric and loose on the other, and both. Goodput is the
highest rate at which attainment stays >= 90% (interpolated between swept rates), as in
DistServe. Setups alternate within each rate.

    .venv/bin/python -m benchmarks.distserve [--rates 0.25,0.5,1,1.5,2] [--num-requests 60]
                                             [--out docs/bench/distserve]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import DEFAULT_TRACE_DIR, markdown_table
from benchmarks.serving import InProcessServer, measured, percentile, trace_workload

MODEL_NAME = "llama-100m"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tandem" / "bench"
PROMPT_SCALE, OUTPUT_SCALE, MAX_PROMPT, MAX_OUTPUT = 1 / 8, 1 / 8, 512, 64
# (name, SLO multiples of a lone request's TTFT and TPOT)
SLO_SCENARIOS = (
    ("tight TPOT, loose TTFT", 8.0, 1.5),
    ("tight TTFT, loose TPOT", 2.0, 5.0),
    ("both moderate", 4.0, 3.0),
)
GOAL = 0.9


def setups(threshold: int) -> dict[str, list[str]]:
    """`tandem serve` flags of each setup (all with one core per worker)."""
    return {
        "disaggregated": ["--num-prefill", "1", "--num-decode", "1", "--local-prefill-tokens", "0"],
        f"disaggregated, local<={threshold}": [
            "--num-prefill",
            "1",
            "--num-decode",
            "1",
            "--local-prefill-tokens",
            str(threshold),
        ],
        "colocated 2x1": ["--num-prefill", "0", "--num-decode", "2"],
        "colocated 1x2": ["--num-prefill", "0", "--num-decode", "1", "--cpus-per-worker", "2"],
    }


def model_dir() -> Path:
    """The ~100M Llama of engine_throughput.py, with a byte-level BPE tokenizer (trained on the
    embedded model's story corpus) and the vocabulary cut to the tokenizer's: streamed text then
    arrives token by token, as from any real model, and TPOT can be measured at the client."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.engine_throughput import ARCH
    from engine.default_model.corpus import stories
    from engine.default_model.tokenizer import train_tokenizer

    path = CACHE_DIR / MODEL_NAME
    if not (path / "config.json").exists():
        print(f"building {path} ...", flush=True)
        path.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer(stories(2000, seed=3), vocab_size=8192, out_dir=path)
        torch.manual_seed(0)
        config = LlamaConfig(
            **{**ARCH, "vocab_size": len(tokenizer)},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config.architectures = ["LlamaForCausalLM"]
        LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def start_server(flags: list[str], model: Path) -> InProcessServer:
    """One setup's workers behind a router, started once for the whole sweep."""
    argv = [
        "serve",
        "--model",
        str(model),
        "--model-name",
        "bench",
        "--kv-backend",
        "shm",
        "--max-num-seqs",
        "32",
        "--max-model-len",
        str(MAX_PROMPT + MAX_OUTPUT + 16),
        "--cpus-per-worker",
        "1",
        *flags,
    ]
    return InProcessServer(argv, log=lambda line: print("   ", line, flush=True))


def workload(trace: Path, rate: float, num_requests: int, seed: int):
    return trace_workload(trace, rate, num_requests, PROMPT_SCALE, OUTPUT_SCALE, MAX_PROMPT, MAX_OUTPUT, seed)


def attainment(results: list[dict], ttft_s: float, tpot_s: float) -> float:
    ok = sum(1 for r in results if r["ttft_s"] is not None and r["ttft_s"] <= ttft_s and r["tpot_s"] <= tpot_s)
    return ok / max(1, len(results))


def goodput(points: list[tuple[float, float]]) -> float:
    """The highest rate with attainment >= GOAL, interpolated between the swept rates."""
    points = sorted(points)
    best = 0.0
    for (r0, a0), (r1, a1) in itertools.pairwise([(0.0, 1.0), *points]):
        if a1 >= GOAL:
            best = r1
        elif a0 >= GOAL:
            return r0 + (r1 - r0) * (a0 - GOAL) / (a0 - a1)
    return best


def calibrate(server: InProcessServer, trace: Path) -> dict[str, float]:
    """A lone request's TTFT with a P90 prompt and its TPOT, on one core: the unit of the SLOs.
    Five requests, each alone (spaced well apart) and each with its own prompt, so that no
    prefix cache serves them."""
    from benchmarks.serving import Request

    reqs = workload(trace, 1.0, 400, seed=99)
    p90_prompt = sorted(r.prompt_len for r in reqs)[int(0.9 * len(reqs))]
    results, _ = server.load([Request(6.0 * i, p90_prompt, 32) for i in range(5)])
    ok = measured(results)
    if len(ok) < len(results):
        failed = next(r.error for r in results if r.ttft_s is None or r.tpot_s is None)
        raise RuntimeError(f"a calibration request failed: {failed}")
    return {
        "p90_prompt_tokens": p90_prompt,
        "ttft_s": statistics.median(ttft for ttft, _, _ in ok),
        "tpot_s": statistics.median(tpot for _, tpot, _ in ok),
    }


def run(args) -> dict:
    model = model_dir()
    trace = args.trace
    plan = setups(args.threshold)
    servers = {}
    raw: dict[str, dict[str, list[dict]]] = {name: {} for name in plan}
    loads = []
    import ray

    # One Ray for every setup: each setup's workers own the same two cores, and only one
    # setup is loaded at a time (Ray's CPU count is bookkeeping: two per setup).
    ray.init(address="local", num_cpus=2 * len(plan), include_dashboard=False, log_to_driver=False)
    try:
        for name, flags in plan.items():
            print(f"starting {name} ...", flush=True)
            servers[name] = start_server(flags, model)
            servers[name].load(workload(trace, 4.0, 4, seed=1))  # warm-up: first forwards pay one-time costs
        unit = calibrate(servers["colocated 2x1"], trace)
        print(
            f"a lone request: TTFT {unit['ttft_s']:.3f} s with a {unit['p90_prompt_tokens']}-token prompt, "
            f"TPOT {unit['tpot_s'] * 1e3:.0f} ms",
            flush=True,
        )
        names = list(plan)
        for i, rate in enumerate(args.rates):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                loads.append(os.getloadavg()[0])
                results, duration = servers[name].load(workload(trace, rate, args.num_requests, seed=i))
                raw[name][str(rate)] = [asdict(r) for r in results]
                ok = measured(results)
                print(
                    f"  rate {rate:g}  {name:28s} P90 TTFT {percentile([ttft for ttft, _, _ in ok], 90):.2f} s  "
                    f"P90 TPOT {percentile([tpot for _, tpot, _ in ok], 90) * 1e3:.0f} ms  "
                    f"failed {len(results) - len(ok)}  ({duration:.0f} s)",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
        ray.shutdown()
    return {
        "unit": unit,
        "rates": args.rates,
        "num_requests": args.num_requests,
        "raw": raw,
        "load_avg": [min(loads), max(loads)] if loads else [],
        "cores": os.cpu_count(),
    }


def report(data: dict, out: Path | None) -> str:
    unit, rates = data["unit"], data["rates"]
    lines = [
        f"Load average during the runs: {data['load_avg'][0]:.2f}-{data['load_avg'][1]:.2f}. "
        f"SLO unit: a lone request's TTFT {unit['ttft_s']:.3f} s ({unit['p90_prompt_tokens']}-token prompt) "
        f"and TPOT {unit['tpot_s'] * 1e3:.0f} ms.",
        "",
    ]
    goodputs = {}
    for scenario, k_ttft, k_tpot in SLO_SCENARIOS:
        ttft, tpot = k_ttft * unit["ttft_s"], k_tpot * unit["tpot_s"]
        rows = []
        for name, by_rate in data["raw"].items():
            points = [(float(r), attainment(res, ttft, tpot)) for r, res in by_rate.items()]
            goodputs[(scenario, name)] = goodput(points)
            rows.append([name] + [f"{a:.0%}" for _, a in sorted(points)] + [f"{goodputs[(scenario, name)]:.2f}"])
        lines += [
            f"**{scenario}** (TTFT <= {ttft:.2f} s, TPOT <= {tpot * 1e3:.0f} ms): SLO attainment by rate "
            f"(req/s), and goodput at {GOAL:.0%} attainment",
            "",
            markdown_table(["setup"] + [f"{r:g}" for r in rates] + ["goodput (req/s)"], rows),
            "",
        ]
    lat_rows = []
    for name, by_rate in data["raw"].items():
        for r, res in sorted(by_rate.items(), key=lambda kv: float(kv[0])):
            ok = [x for x in res if x["ttft_s"] is not None]
            lat_rows.append(
                [
                    name,
                    r,
                    f"{percentile([x['ttft_s'] for x in ok], 50):.2f}",
                    f"{percentile([x['ttft_s'] for x in ok], 90):.2f}",
                    f"{percentile([x['tpot_s'] for x in ok], 50) * 1e3:.0f}",
                    f"{percentile([x['tpot_s'] for x in ok], 90) * 1e3:.0f}",
                    len(res) - len(ok),
                ]
            )
    lines += [
        "Latencies",
        "",
        markdown_table(
            ["setup", "rate", "TTFT p50 (s)", "TTFT p90 (s)", "TPOT p50 (ms)", "TPOT p90 (ms)", "failed"], lat_rows
        ),
    ]
    text = "\n".join(lines)
    if out is not None:
        _plot(data, out / "attainment.png")
    return text


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = data["unit"]
    fig, axes = plt.subplots(1, len(SLO_SCENARIOS), figsize=(5 * len(SLO_SCENARIOS), 3.8), sharey=True)
    for ax, (scenario, k_ttft, k_tpot) in zip(axes, SLO_SCENARIOS, strict=True):
        for name, by_rate in data["raw"].items():
            pts = sorted(
                (float(r), attainment(res, k_ttft * unit["ttft_s"], k_tpot * unit["tpot_s"]))
                for r, res in by_rate.items()
            )
            ax.plot([r for r, _ in pts], [a * 100 for _, a in pts], marker="o", label=name)
        ax.axhline(GOAL * 100, color="grey", ls="--", lw=1)
        ax.set_title(scenario)
        ax.set_xlabel("rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SLO attainment (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 1, 1.5, 2])
    parser.add_argument("--num-requests", type=int, default=60)
    parser.add_argument("--threshold", type=int, default=64, help="conditional disaggregation: local prefill <= T")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE_DIR / "conv.csv")
    parser.add_argument("--out", type=Path, help="write results.json, report.md and attainment.png here")
    parser.add_argument("--report-only", action="store_true", help="re-read --out/results.json and report")
    args = parser.parse_args()
    if args.report_only:
        data = json.loads((args.out / "results.json").read_text())
    else:
        started = time.monotonic()
        data = run(args)
        print(f"sweep took {time.monotonic() - started:.0f} s")
    text = report(data, args.out)
    print("\n" + text)
    if args.out is not None and not args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(data))
        (args.out / "report.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

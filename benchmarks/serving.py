"""Load generator for a running Tandem (or any OpenAI-compatible) server, and a side-by-side
comparison of disaggregated and colocated serving.

    tandem bench --url http://127.0.0.1:8000 --rate 4 --num-requests 100
    tandem bench --compare --rates 2,4,8 [--trace conv.csv] --out docs/bench

Each request streams a completion; TTFT is the time to its first token, TPOT the mean time
between its later tokens. A request meets the SLO when both are within their targets;
goodput is such requests per second of the run.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import read_trace


@dataclass(frozen=True)
class Request:
    arrival_s: float  # offset from the start of the run
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Result:
    ttft_s: float | None  # None: the request failed
    tpot_s: float | None
    output_tokens: int
    error: str | None = None  # why it failed: the HTTP status and body, or the exception
    # From the first text chunk to the second: disaggregated, the hand-off from the prefill
    # worker (which sampled the first token) to the decode worker (KV in, admitted, a step).
    handoff_s: float | None = None


def poisson_workload(rate: float, num_requests: int, prompt_len: int, output_len: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        out.append(
            Request(t, max(1, int(rng.uniform(0.5, 1.5) * prompt_len)), max(1, int(rng.uniform(0.5, 1.5) * output_len)))
        )
    return out


def trace_workload(
    path: str | Path,
    rate: float,
    num_requests: int,
    prompt_scale: float,
    output_scale: float,
    max_prompt: int,
    max_output: int,
    seed: int = 0,
) -> list[Request]:
    """Lengths from a trace (scaled to fit a small model), arrivals Poisson at `rate`."""
    rows = read_trace(path)
    rng = random.Random(seed)
    picked = [rows[rng.randrange(len(rows))] for _ in range(num_requests)]
    arrivals = poisson_workload(rate, num_requests, 1, 1, seed)
    return [
        Request(
            a.arrival_s,
            max(1, min(max_prompt, round(p * prompt_scale))),
            max(1, min(max_output, round(o * output_scale))),
        )
        for a, (p, o) in zip(arrivals, picked, strict=True)
    ]


async def _one(session, url: str, model: str, req: Request, vocab: int, seed: int, temperature: float) -> Result:
    rng = random.Random(seed)
    prompt = [rng.randrange(3, vocab) for _ in range(req.prompt_len)]
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": req.output_len,
        "temperature": temperature,
        "seed": seed,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    times = []
    num_tokens = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return Result(None, None, 0, f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return Result(None, None, 0, f"in the stream: {chunk['error'].get('message')}")
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    times.append(time.monotonic())
                if chunk.get("usage"):
                    num_tokens = chunk["usage"]["completion_tokens"]
    except OSError as exc:
        return Result(None, None, 0, repr(exc))
    if not times:
        return Result(None, None, 0, "no text chunk")
    # Per token, not per chunk: a chunk may carry several tokens (text held until a character
    # is complete), so the span between the first and the last chunk is divided by the tokens.
    num_tokens = num_tokens or len(times)
    tpot = (times[-1] - times[0]) / (num_tokens - 1) if num_tokens > 1 else 0.0
    return Result(times[0] - start, tpot, num_tokens, handoff_s=times[1] - times[0] if len(times) > 1 else None)


async def run_load(
    url: str, model: str, workload: list[Request], vocab: int = 500, temperature: float = 0.0, seed_base: int = 0
) -> tuple[list[Result], float]:
    """Fire the workload at its arrival times; temperature > 0 samples (each request seeded),
    which keeps a random-weight model from repeating one token that never completes a character.
    Request i's prompt and sampling are seeded with seed_base + i: runs against one server that
    must not find each other's prompts in its prefix caches take different seed_bases."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.monotonic()

        async def fire(i: int, req: Request) -> Result:
            await asyncio.sleep(max(0.0, req.arrival_s - (time.monotonic() - start)))
            return await _one(session, url, model, req, vocab, seed=seed_base + i, temperature=temperature)

        results = await asyncio.gather(*(fire(i, r) for i, r in enumerate(workload)))
        return list(results), time.monotonic() - start


class InProcessServer:
    """`tandem serve ARGV` run in this process (its workers on Ray) and loaded over its HTTP API
    as the model name "bench" (ARGV passes --model-name bench), sampling with temperature 1."""

    def __init__(self, argv: list[str], log: Callable[[str], None]):
        from deploy.cli import build_parser
        from deploy.commands import start_backend

        args = build_parser().parse_args(argv)
        self.vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        self.backend, self.stop = start_backend(args, log=log)

    def take_steps(self) -> dict[str, list]:
        """The steps each role's workers ran since the last call (StepRecords), by role."""

        taken: dict[str, list] = {"prefill": [], "decode": []}
        for worker in asyncio.run(self.backend.take_steps()):
            taken[worker.role.value].extend(worker.steps)
        return taken

    def load(self, workload: list[Request], seed_base: int = 0) -> tuple[list[Result], float]:
        """Run the workload against the server (run_load; seed_base: its prompts' seeds)."""
        from router.server import serve

        async def main() -> tuple[list[Result], float]:
            handle = await serve(self.backend, http_port=0, grpc_port=0, host="127.0.0.1")
            try:
                return await run_load(
                    f"http://127.0.0.1:{handle.http_port}",
                    "bench",
                    workload,
                    vocab=self.vocab,
                    temperature=1.0,
                    seed_base=seed_base,
                )
            finally:
                await handle.stop(grace_s=1.0)

        return asyncio.run(main())


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))]


def measured(results: list[Result]) -> list[tuple[float, float, int]]:
    """(ttft_s, tpot_s, output_tokens) of each request that succeeded."""
    return [(r.ttft_s, r.tpot_s, r.output_tokens) for r in results if r.ttft_s is not None and r.tpot_s is not None]


def summarize(results: list[Result], duration_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict[str, float]:
    ok = measured(results)
    ttfts, tpots = [ttft for ttft, _, _ in ok], [tpot for _, tpot, _ in ok]
    num_good = sum(1 for ttft, tpot, _ in ok if ttft <= slo_ttft_s and tpot <= slo_tpot_s)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p90_s": percentile(tpots, 90),
        "tpot_p99_s": percentile(tpots, 99),
        "attainment": num_good / max(1, len(results)),
        "goodput_rps": num_good / duration_s,
        "throughput_tok_s": sum(n for _, _, n in ok) / duration_s,
        "duration_s": duration_s,
        "mean_ttft_s": statistics.fmean(ttfts) if ttfts else float("nan"),
    }


SUMMARY_COLUMNS = [
    ("TTFT p50 (s)", "ttft_p50_s"),
    ("TTFT p90 (s)", "ttft_p90_s"),
    ("TPOT p50 (ms)", "tpot_p50_s"),
    ("TPOT p90 (ms)", "tpot_p90_s"),
    ("SLO attainment", "attainment"),
    ("goodput (req/s)", "goodput_rps"),
    ("tokens/s", "throughput_tok_s"),
    ("failed", "failed"),
]


def format_row(label: list[str], s: dict[str, float]) -> list[str]:
    cells = []
    for _, key in SUMMARY_COLUMNS:
        v = s[key]
        cells.append(
            f"{v * 1e3:.0f}"
            if key.startswith("tpot")
            else f"{v:.0%}"
            if key == "attainment"
            else str(int(v))
            if key == "failed"
            else f"{v:.2f}"
        )
    return label + cells


def plot(rows: list[tuple[str, float, dict]], path: Path, slo_ttft_s: float, slo_tpot_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode in sorted({m for m, _, _ in rows}):
        pts = sorted((r, s) for m, r, s in rows if m == mode)
        rates = [r for r, _ in pts]
        axes[0].plot(rates, [s["ttft_p90_s"] for _, s in pts], marker="o", label=mode)
        axes[1].plot(rates, [s["tpot_p90_s"] * 1e3 for _, s in pts], marker="o", label=mode)
        axes[2].plot(rates, [s["goodput_rps"] for _, s in pts], marker="o", label=mode)
    axes[0].axhline(slo_ttft_s, color="grey", ls="--", lw=1)
    axes[1].axhline(slo_tpot_s * 1e3, color="grey", ls="--", lw=1)
    for ax, title in zip(axes, ["P90 TTFT (s)", "P90 TPOT (ms)", "goodput (req/s within SLO)"], strict=True):
        ax.set_xlabel("offered rate (req/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)

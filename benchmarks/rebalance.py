"""A load shift, served by a static prefill:decode split and by the online rebalancer.

    python -m benchmarks.rebalance --out docs/bench/rebalance [--repeats 2]

Two workers that can change role (tandem serve --autoscale's), each on a core of its own,
serve the ~100M Llama of benchmarks/distserve.py, starting as 1 prefill + 1 decode worker.
The load shifts halfway, from prompt-heavy to decode-heavy and from a low rate to a high one:
the Azure conversation trace's lengths scaled as in distserve.py (prompts and outputs x 1/8:
146 and 27 tokens on average) at 0.5 req/s, then prompts x 1/16 and outputs x 1/2 (73 and
107 tokens) at 0.8 req/s; Poisson arrivals. Rounds alternate:
- static: the split stays 1P:1D;
- adaptive: the rebalancer (router/rebalance.py) runs, with the planner's capacity model
  over the profile `tandem profile` measured for this model on one core.
Between rounds the split is put back to 1P:1D. Per round: SLO attainment and goodput (requests
that met both targets, per second) in each phase and over time, and the role changes made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import DEFAULT_TRACE_DIR, markdown_table, write_results

PROFILE = Path(__file__).resolve().parents[1] / "docs" / "bench" / "closed-loop" / "after-channel" / "profile.yaml"
# The "both moderate" SLO of benchmarks/distserve.py (4x and 3x a lone request's TTFT and TPOT
# on one core, docs/bench/distserve): one where that benchmark measured 1P:1D falling behind
# two colocated workers at 1 req/s.
SLO_TTFT_S, SLO_TPOT_S = 4.63, 0.174
BIN_S = 15.0


def log(msg: str) -> None:
    print(f"[rebalance] {msg}", file=sys.stderr, flush=True)


# Each phase's lengths: (prompt scale, output scale, longest prompt, longest output).
PHASES = ((1 / 8, 1 / 8, 512, 64), (1 / 16, 1 / 2, 256, 256))
MAX_MODEL_LEN = 592


def shifted_workload(trace: Path, rates: tuple[float, float], phase_s: tuple[float, float], seed: int):
    """Requests of the first phase, then the second one's, arrivals in seconds from the start."""
    from benchmarks.serving import Request, trace_workload

    first = [r for r in trace_workload(trace, rates[0], 2_000, *PHASES[0], seed) if r.arrival_s < phase_s[0]]
    second = [r for r in trace_workload(trace, rates[1], 2_000, *PHASES[1], seed + 1) if r.arrival_s < phase_s[1]]
    return first + [Request(phase_s[0] + r.arrival_s, r.prompt_len, r.output_len) for r in second]


def met(result) -> bool:
    return result.ttft_s is not None and result.ttft_s <= SLO_TTFT_S and (result.tpot_s or 0.0) <= SLO_TPOT_S


async def one_round(args, backend, serve_args, mode: str, workload, vocab: int) -> dict:
    from benchmarks.serving import run_load
    from deploy.commands import start_rebalancer
    from router.rebalance import change_role
    from router.server import serve

    backend.arrivals.clear()
    backend.finished.clear()
    handle = await serve(backend, http_port=0, grpc_port=0, host="127.0.0.1")
    rebalancer = await start_rebalancer(serve_args, backend, log=log) if mode == "adaptive" else None
    started = time.monotonic()
    try:
        results, elapsed = await run_load(
            f"http://127.0.0.1:{handle.http_port}", "bench", workload, vocab=vocab, temperature=1.0
        )
    finally:
        if rebalancer is not None:
            await rebalancer.stop()
    changes, decisions = [], []
    if rebalancer is not None:
        changes = [
            {
                "at_s": at - started,
                "from": f"{c.before[0].value} {c.before[1]}",
                "to": f"{c.after[0].value} {c.after[1]}",
            }
            for at, c in rebalancer.changes
        ]
        decisions = [
            {
                "at_s": d.at_s - started,
                "rate_rps": d.rate_rps,
                "current": str(d.current),
                "best": str(d.best),
                "action": d.action,
                "reason": d.reason,
            }
            for d in rebalancer.decisions
        ]
        # Back to 1P:1D for the next round.
        for _, change in reversed(rebalancer.changes):
            await change_role(backend, *change.after)
    await handle.stop(grace_s=1.0)
    return {
        "mode": mode,
        "elapsed_s": elapsed,
        "requests": [
            {
                "arrival_s": req.arrival_s,
                "prompt": req.prompt_len,
                "output": req.output_len,
                "ttft_s": res.ttft_s,
                "tpot_s": res.tpot_s,
                "met": met(res),
                "error": res.error,
            }
            for req, res in zip(workload, results, strict=True)
        ],
        "changes": changes,
        "decisions": decisions,
        "load_average": os.getloadavg(),
    }


def phase_figures(round_: dict, phase_s: tuple[float, float]) -> dict:
    reqs = round_["requests"]
    out = {}
    for name, lo, hi in (("low", 0.0, phase_s[0]), ("high", phase_s[0], sum(phase_s))):
        mine = [r for r in reqs if lo <= r["arrival_s"] < hi]
        ok = [r for r in mine if r["ttft_s"] is not None]
        out[name] = {
            "requests": len(mine),
            "attainment": sum(r["met"] for r in mine) / max(1, len(mine)),
            "goodput_rps": sum(r["met"] for r in mine) / (hi - lo),
            "p90_ttft_s": _p90([r["ttft_s"] for r in ok]),
            "p90_tpot_s": _p90([r["tpot_s"] for r in ok if r["tpot_s"] is not None]),
            "failed": len(mine) - len(ok),
        }
    return out


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))] if values else float("nan")


def table(rounds: list[dict], phase_s: tuple[float, float], rates: tuple[float, float]) -> str:
    rows = []
    for mode in ("static", "adaptive"):
        mine = [phase_figures(r, phase_s) for r in rounds if r["mode"] == mode]
        changes = [r["changes"] for r in rounds if r["mode"] == mode]
        cells = [mode, len(mine)]
        for phase in ("low", "high"):
            cells += [
                f"{statistics.median(m[phase]['attainment'] for m in mine):.0%}",
                f"{statistics.median(m[phase]['goodput_rps'] for m in mine):.2f}",
            ]
        cells += [
            f"{statistics.median(m['high']['p90_ttft_s'] for m in mine):.2f}",
            f"{1e3 * statistics.median(m['high']['p90_tpot_s'] for m in mine):.0f}",
            "; ".join(
                ", ".join(f"{c['from']} -> {c['to']} at {c['at_s']:.0f} s" for c in cs) or "none" for cs in changes
            ),
        ]
        rows.append(cells)
    header = [
        "split",
        "rounds",
        f"attainment, prompt-heavy {rates[0]:g} req/s",
        "goodput req/s",
        f"attainment, decode-heavy {rates[1]:g} req/s",
        "goodput req/s",
        "P90 TTFT s (high)",
        "P90 TPOT ms (high)",
        "role changes (each round)",
    ]
    loads = [r["load_average"][0] for r in rounds]
    return (
        markdown_table(header, rows)
        + f"\n\nThe load shifts at {phase_s[0]:g} s. Medians over rounds; "
        + f"load average (1 min) at the end of each round: {', '.join(f'{x:.2f}' for x in loads)}.\n"
    )


def plot(rounds: list[dict], phase_s: tuple[float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    total = sum(phase_s)
    edges = [i * BIN_S for i in range(int(total // BIN_S) + 1)]
    for r in rounds:
        style = "-" if r["mode"] == "adaptive" else "--"
        xs, att, good = [], [], []
        for lo in edges:
            mine = [q for q in r["requests"] if lo <= q["arrival_s"] < lo + BIN_S]
            if mine:
                xs.append(lo + BIN_S / 2)
                att.append(sum(q["met"] for q in mine) / len(mine))
                good.append(sum(q["met"] for q in mine) / BIN_S)
        top.plot(xs, att, style, marker="o", markersize=3, label=r["mode"])
        bottom.plot(xs, good, style, marker="o", markersize=3, label=r["mode"])
        for c in r["changes"]:
            for ax in (top, bottom):
                ax.axvline(c["at_s"], color="green", alpha=0.4, linewidth=1)
    for ax in (top, bottom):
        ax.axvline(phase_s[0], color="red", alpha=0.5, linestyle=":")
        ax.grid(True, alpha=0.3)
    top.set_ylabel("SLO attainment")
    bottom.set_ylabel("goodput (req/s met SLO)")
    bottom.set_xlabel(f"arrival time (s), {BIN_S:g} s bins; red: load step, green: role changes")
    handles, labels = top.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    top.legend(uniq.values(), uniq.keys(), fontsize=8)
    top.set_title("Static 1P:1D against online P:D rebalancing (~100M Llama, 1 core per worker)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for results.json, table.md and plot.png")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of each mode, alternated")
    parser.add_argument("--rates", default="0.5,0.8", help="req/s before and after the shift")
    parser.add_argument("--phases-s", default="75,120", help="seconds of each phase")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE_DIR / "conv.csv")
    parser.add_argument("--profile", type=Path, default=PROFILE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rates = tuple(float(x) for x in args.rates.split(","))
    phase_s = tuple(float(x) for x in args.phases_s.split(","))
    if len(rates) != 2 or len(phase_s) != 2:
        parser.error("--rates and --phases-s take two values each")

    import ray

    from benchmarks.distserve import model_dir
    from deploy.cli import build_parser
    from deploy.commands import start_backend

    model = model_dir()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    argv = ["serve", "--model", str(model), "--model-name", "bench", "--kv-backend", "shm", "--max-num-seqs", "32"]
    argv += ["--max-model-len", str(MAX_MODEL_LEN), "--cpus-per-worker", "1"]
    argv += ["--num-prefill", "1", "--num-decode", "1", "--local-prefill-tokens", "0"]
    argv += ["--autoscale", "--autoscale-profile", str(args.profile)]
    argv += ["--slo-ttft-s", str(SLO_TTFT_S), "--slo-tpot-s", str(SLO_TPOT_S)]
    argv += ["--autoscale-interval-s", "5", "--autoscale-window-s", "30", "--autoscale-cooldown-s", "30"]
    serve_args = build_parser().parse_args(argv)
    log(f"starting 2 workers that can change role, load average {os.getloadavg()[0]:.2f}")
    backend, stop = start_backend(serve_args, log=log)
    rounds = []
    try:
        for i in range(args.repeats):
            for mode in ("static", "adaptive") if i % 2 == 0 else ("adaptive", "static"):
                workload = shifted_workload(args.trace, rates, phase_s, args.seed + 10 * i)
                log(f"round {i + 1}/{args.repeats}: {mode}, {len(workload)} requests")
                rounds.append(asyncio.run(one_round(args, backend, serve_args, mode, workload, vocab)))
                figures = phase_figures(rounds[-1], phase_s)
                low, high = figures["low"]["attainment"], figures["high"]["attainment"]
                log(
                    f"  {mode}: attainment {low:.0%} then {high:.0%}, "
                    f"changes {rounds[-1]['changes']}, load average {os.getloadavg()[0]:.2f}"
                )
    finally:
        stop()
        if ray.is_initialized():
            ray.shutdown()
    text = table(rounds, phase_s, rates)
    print(text)
    results = {
        "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S},
        "rates": rates,
        "phases_s": phase_s,
        "rounds": rounds,
        "figures": [{"mode": r["mode"], **phase_figures(r, phase_s)} for r in rounds],
    }
    write_results(args.out, results, text)
    if args.out:
        plot(rounds, phase_s, args.out / "plot.png")


if __name__ == "__main__":
    main()

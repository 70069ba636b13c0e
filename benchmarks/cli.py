"""`tandem bench`: load a running server, or compare disaggregated and colocated serving."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from benchmarks.common import DEFAULT_TRACE_DIR, markdown_table
from kv_transfer.registry import backend_names


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure TTFT, TPOT and goodput under load")
    p.add_argument("--url", help="a running server's HTTP base URL (without --compare)")
    p.add_argument("--model-name", default=None, help="model name to send (default: the server's first)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="start disaggregated (1 prefill + 1 decode) and colocated serving in turn, same load",
    )
    p.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson arrivals)")
    p.add_argument("--rates", default="1,2,4", help="with --compare: comma-separated rates to sweep")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--trace", help=f"an Azure LLM trace CSV for lengths (e.g. {DEFAULT_TRACE_DIR}/conv.csv)")
    p.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens without a trace")
    p.add_argument("--output-len", type=int, default=32, help="mean output tokens without a trace")
    p.add_argument("--prompt-scale", type=float, default=1 / 8, help="trace prompt lengths are multiplied by this")
    p.add_argument("--output-scale", type=float, default=1 / 4)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--slo-ttft", type=float, default=0.5, help="TTFT target in seconds")
    p.add_argument("--slo-tpot", type=float, default=0.05, help="TPOT target in seconds")
    p.add_argument("--out", help="directory for results.json, table.md and plot.png")
    p.add_argument("--model", help="with --compare: checkpoint directory (default: the embedded model)")
    p.add_argument("--kv-backend", choices=backend_names())
    p.set_defaults(run=_bench)


def _workload(args, rate: float):
    from benchmarks.serving import poisson_workload, trace_workload

    if args.trace:
        return trace_workload(
            args.trace, rate, args.num_requests, args.prompt_scale, args.output_scale, args.max_prompt, args.max_output
        )
    return poisson_workload(rate, args.num_requests, args.prompt_len, args.output_len)


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.serving import SUMMARY_COLUMNS, format_row, run_load, summarize

    header = [c for c, _ in SUMMARY_COLUMNS]
    if not args.compare:
        if not args.url:
            raise ValueError("--url is required without --compare (or pass --compare to start servers here)")
        results, duration = asyncio.run(
            run_load(args.url.rstrip("/"), args.model_name or "", _workload(args, args.rate))
        )
        summary = summarize(results, duration, args.slo_ttft, args.slo_tpot)
        print(markdown_table(["rate (req/s)"] + header, [format_row([f"{args.rate:g}"], summary)]))
        return 0

    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    for mode in ("disaggregated", "colocated"):
        for rate in rates:
            summary = _run_mode(args, mode, rate)
            rows.append((mode, rate, summary))
            print(
                f"  {mode:14s} rate {rate:g}: P90 TTFT {summary['ttft_p90_s']:.2f}s  "
                f"P90 TPOT {summary['tpot_p90_s'] * 1e3:.0f}ms  goodput {summary['goodput_rps']:.2f} req/s",
                flush=True,
            )
    table = markdown_table(["mode", "rate (req/s)"] + header, [format_row([m, f"{r:g}"], s) for m, r, s in rows])
    print("\n" + table)
    if args.out:
        from benchmarks.serving import plot

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps([{"mode": m, "rate": r, **s} for m, r, s in rows], indent=1))
        (out / "table.md").write_text(table + "\n")
        plot(rows, out / "plot.png", args.slo_ttft, args.slo_tpot)
        print(f"\nwrote {out}/results.json, table.md, plot.png")
    return 0


def _run_mode(args: argparse.Namespace, mode: str, rate: float) -> dict:
    """Fresh servers for every point, so that no run inherits another's queues or caches."""
    from benchmarks.serving import run_load, summarize
    from deploy.cli import build_parser
    from deploy.commands import start_backend
    from router.server import serve

    argv = ["serve", "--model-name", "bench", "--local-prefill-tokens", "0"]
    argv += ["--model", args.model] if args.model else []
    argv += ["--kv-backend", args.kv_backend] if args.kv_backend else []
    argv += ["--colocated"] if mode == "colocated" else []
    serve_args = build_parser().parse_args(argv)  # `tandem serve`'s own defaults
    backend, stop_backend = start_backend(serve_args, log=lambda _: None)

    async def main():
        handle = await serve(backend, http_port=0, grpc_port=0, host="127.0.0.1")
        try:
            return await run_load(f"http://127.0.0.1:{handle.http_port}", "bench", _workload(args, rate))
        finally:
            await handle.stop(grace_s=1.0)

    try:
        results, duration = asyncio.run(main())
    finally:
        stop_backend()
    return summarize(results, duration, args.slo_ttft, args.slo_tpot)

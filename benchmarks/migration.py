"""Live migration against recomputation: how long a stream pauses when its decode worker drains.

    python -m benchmarks.migration --out docs/bench/migration [--backends shm,nixl,torch_dist]
        [--contexts 128,512,1024,1920] [--repeats 3]

Two decode workers on Ray, each pinned to a core of its own (the router and this client run
unpinned beside them), serve the ~100M Llama of benchmarks/distserve.py (float32, 12 layers,
24 KiB of KV per token). For each context length, one greedy stream with a prompt of that
many tokens starts on decode worker 0; after its 8th token, worker 0 is drained
(DisaggregatedBackend.drain), and the stream moves to worker 1 either
- migrate: live migration (its KV copied through the KV transport, the stream going on from
  its next token), or
- resume: stopped and resumed on worker 1 after the tokens it had, recomputing their KV there
  (what drain did before migration existed).
Prefix caching is off, so that a resume recomputes the whole context (the rounds at a length
repeat one prompt, which the destination would otherwise have cached).
The two alternate, round by round, on the same deployment. Measured per round: the pause the
client sees (the longest wait for a token once the drain began), the median gap
between tokens before the move (one decode step), and for migrations the router's own
figures: the pause from the detach to the first token on the destination, and the KV copy's
share of it. Every stream is checked token for token against the first round's at its length
(greedy: a move must not change a token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator

from benchmarks.common import markdown_table, write_results

MAX_TOKENS = 32
MOVE_AFTER = 8  # tokens streamed before the drain
KV_BYTES_PER_TOKEN = 2 * 12 * 4 * 64 * 4  # K and V, 12 layers, 4 KV heads of 64, float32


def log(msg: str) -> None:
    print(f"[migration] {msg}", file=sys.stderr, flush=True)


async def one_round(backend, rid: str, prompt: list[int], mode: str) -> dict:
    """One stream on decode worker 0, drained after MOVE_AFTER tokens; its tokens and timings."""
    from engine import SamplingParams
    from proto.serving import GenerateRequest

    backend.migrate_on_drain = mode == "migrate"
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    before = dict(backend.counters)
    backend.policy.decode[1].draining = True  # the stream starts on worker 0
    times: list[float] = []  # when each token arrived
    tokens: list[int] = []
    drain: asyncio.Task | None = None
    moved_at = 0.0
    try:
        async with contextlib.aclosing(backend.generate(GenerateRequest(rid, tuple(prompt), params))) as stream:
            async for delta in stream:
                if delta.finish_reason == "error":
                    raise RuntimeError(f"{rid} failed: {delta.error}")
                now = time.monotonic()
                times += [now] * len(delta.token_ids)
                tokens += delta.token_ids
                if drain is None and len(tokens) >= MOVE_AFTER:
                    backend.policy.decode[1].draining = False
                    moved_at = now
                    drain = asyncio.ensure_future(backend.drain("decode", 0))
        assert drain is not None, f"{rid} ended before its move"
        await drain
    finally:
        backend.undrain("decode", 0)
        backend.undrain("decode", 1)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    after = next(i for i, t in enumerate(times) if t > moved_at)
    moved = {k: backend.counters[k] - before[k] for k in ("migrations_total", "moves_total")}
    if moved != {"migrations_total": int(mode == "migrate"), "moves_total": int(mode == "resume")}:
        raise RuntimeError(f"{rid}: expected one {mode}, the counters say {moved}")
    migration = backend.migrations[-1] if mode == "migrate" else None
    return {
        "tokens": tokens,
        "pause_s": max(gaps[after - 1 :]),  # the longest wait for a token once the move began
        "tpot_s": statistics.median(gaps[: after - 1]),
        "router_pause_s": migration.pause_s if migration else None,
        "copy_s": migration.copy_s if migration else None,
    }


async def sweep(backend, kv: str, contexts: list[int], repeats: int, vocab: int) -> tuple[list[dict], list[dict]]:
    """Every context length's rounds, migrate and resume alternating; (rows of medians, rounds)."""
    rng = random.Random(0)
    rows: list[dict] = []
    rounds: list[dict] = []
    for n in contexts:
        prompt = [rng.randrange(3, vocab) for _ in range(n)]
        reference = None
        by_mode: dict[str, list[dict]] = {"migrate": [], "resume": []}
        for k in range(repeats):
            for mode in ("migrate", "resume") if k % 2 == 0 else ("resume", "migrate"):
                r = await one_round(backend, f"{kv}-{n}-{k}-{mode}", prompt, mode)
                reference = reference or r["tokens"]
                if r["tokens"] != reference:
                    raise RuntimeError(f"{kv}, {n} tokens, {mode}: the tokens changed")
                by_mode[mode].append(r)
                rounds.append({"backend": kv, "context": n, "mode": mode, **r, "tokens": len(r["tokens"])})
                log(f"  {kv} {n:5d} {mode:7s} pause {r['pause_s'] * 1e3:7.1f} ms")

        def med(mode: str, key: str, runs: dict[str, list[dict]] = by_mode) -> float:
            return statistics.median(x[key] for x in runs[mode])

        rows.append(
            {
                "backend": kv,
                "context": n,
                "kv_mib": (n + MOVE_AFTER) * KV_BYTES_PER_TOKEN / 2**20,
                "migrate_pause_ms": med("migrate", "pause_s") * 1e3,
                "copy_ms": med("migrate", "copy_s") * 1e3,
                "router_pause_ms": med("migrate", "router_pause_s") * 1e3,
                "resume_pause_ms": med("resume", "pause_s") * 1e3,
                "tpot_ms": med("migrate", "tpot_s") * 1e3,
            }
        )
    return rows, rounds


def table(rows: list[dict], load: tuple[float, float, float]) -> str:
    header = [
        "backend",
        "context tokens",
        "KV MiB",
        "migrate: pause ms",
        "detach to next token ms",
        "of which copy ms",
        "resume: pause ms",
        "resume / migrate",
        "TPOT ms",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["backend"],
                r["context"],
                f"{r['kv_mib']:.1f}",
                f"{r['migrate_pause_ms']:.0f}",
                f"{r['router_pause_ms']:.0f}",
                f"{r['copy_ms']:.0f}",
                f"{r['resume_pause_ms']:.0f}",
                f"{r['resume_pause_ms'] / r['migrate_pause_ms']:.1f}x",
                f"{r['tpot_ms']:.0f}",
            ]
        )
    note = (
        f"\nMedians of the rounds at each length (migrate and resume alternating); "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.\n"
    )
    return markdown_table(header, body) + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="shm,nixl,torch_dist", help="KV transports, comma-separated")
    parser.add_argument("--contexts", default="128,512,1024,1920", help="prompt lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="migrate/resume pairs per length (default 3)")
    parser.add_argument("--out", help="directory for results.json, table.md and plot.png")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]

    rows: list[dict] = []
    rounds: list[dict] = []
    for kv in args.backends.split(","):
        # No prefix cache: a resumed stream recomputes its whole context, as on a worker
        # that never saw its prompt (each length's rounds repeat one prompt).
        with pinned_decoders(kv, max_model_len=2048, num_blocks=512, tag=f"{kv}: ") as backend:
            vocab = len(backend.tokenizer) if backend.tokenizer is not None else 1000
            swept = asyncio.run(sweep(backend, kv, contexts, args.repeats, vocab))
            rows += swept[0]
            rounds += swept[1]
    load = os.getloadavg()
    text = table(rows, load)
    print(text)
    write_results(args.out, {"rows": rows, "rounds": rounds, "loadavg": load}, text)
    if args.out:
        plot(rows, os.path.join(args.out, "plot.png"))
    return 0


@contextlib.contextmanager
def pinned_decoders(kv: str, max_model_len: int, num_blocks: int, tag: str = "") -> Iterator:
    """Two decode workers of the ~100M Llama (benchmarks/distserve.py) on Ray, each pinned to a
    core of its own, prompts prefilled where they decode, prefix caching off; yields their
    router backend (this process), and shuts Ray down after."""
    import ray

    from benchmarks.distserve import model_dir
    from deploy.cluster import WorkerGroup, deploy
    from engine import EngineConfig
    from proto.serving import Role

    model = model_dir()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    log(f"{tag}starting 2 decode workers on a core each, load average {os.getloadavg()[0]:.2f}")
    try:
        config = EngineConfig(
            max_model_len=max_model_len,
            max_num_batched_tokens=512,
            num_blocks=num_blocks,
            enable_prefix_caching=False,
        )
        dep = deploy(
            model,
            [WorkerGroup(Role.DECODE, 2)],
            config,
            kv_backend=kv,
            model_name="bench",
            local_prefill_tokens=10**6,
            pin_cores=True,
        )
        try:
            yield dep.backend
        finally:
            dep.shutdown()
    finally:
        ray.shutdown()


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kv in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == kv]
        xs = [r["context"] for r in mine]
        ax.plot(xs, [r["migrate_pause_ms"] for r in mine], marker="o", label=f"migrate ({kv})")
        ax.plot(xs, [r["resume_pause_ms"] for r in mine], marker="x", linestyle="--", label=f"resume ({kv})")
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("pause the client sees (ms)")
    ax.set_yscale("log")
    ax.set_title("Moving a stream off a draining decode worker (~100M Llama, 1 core each)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

"""A decode worker running out of KV blocks: shed a request to another by migration, or preempt.

    python -m benchmarks.kv_pressure --out docs/bench/kv_pressure [--repeats 3]

Two decode workers on Ray, each pinned to a core of its own, serve the ~100M Llama of
benchmarks/distserve.py; each holds 1,536 tokens of KV. Four greedy streams (prompts of 256
tokens, 160 tokens out: 1,664 tokens of KV at their end) start together on decode worker 0
(worker 1 takes no new request until all four run: the imbalance that output lengths nobody
knows at admission leave behind). Rounds alternate between
- migrate: the router's pressure rule (router/policy.py pick_shed): once worker 0 is 90%
  full, its largest request that fits moves to worker 1 with its KV;
- preempt: that rule off (migrate_on_pressure=False): worker 0's scheduler preempts a
  request when a block runs out, and recomputes it later.
Per round: preemptions on worker 0, migrations, the time until the last stream ended, each
stream's longest wait for a token, and the tokens, which must be the same in every round.
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

from benchmarks.common import markdown_table, write_results
from benchmarks.migration import pinned_decoders

NUM_STREAMS = 4
PROMPT_TOKENS = 256
MAX_TOKENS = 160
KV_TOKENS = 1536  # per decode worker: 96 blocks of 16


def log(msg: str) -> None:
    print(f"[kv_pressure] {msg}", file=sys.stderr, flush=True)


async def one_round(backend, prompts: dict[str, list[int]], mode: str, tag: str) -> dict:
    from engine import SamplingParams
    from proto.serving import GenerateRequest

    backend.migrate_on_pressure = mode == "migrate"
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    await backend.refresh()
    before = dict(backend.counters)
    preempted_before = backend.policy.decode[0].stats.num_preemptions
    started = {rid: asyncio.Event() for rid in prompts}

    async def stream(rid: str, prompt: list[int]) -> dict:
        tokens: list[int] = []
        last, gap = None, 0.0
        request = GenerateRequest(f"{tag}-{rid}", tuple(prompt), params)
        async with contextlib.aclosing(backend.generate(request)) as deltas:
            async for delta in deltas:
                if delta.finish_reason == "error":
                    raise RuntimeError(f"{rid} failed: {delta.error}")
                now = time.monotonic()
                gap = max(gap, now - last) if last is not None else gap
                last = now
                tokens += delta.token_ids
                started[rid].set()
        return {"tokens": tokens, "max_gap_s": gap, "end_s": time.monotonic()}

    async def watch():  # the server's stats refresh (router/server.py), which runs pick_shed
        while True:
            await backend.refresh()
            await asyncio.sleep(0.2)

    t0 = time.monotonic()
    backend.policy.decode[1].draining = True
    watcher = asyncio.ensure_future(watch())
    try:
        tasks = {rid: asyncio.ensure_future(stream(rid, p)) for rid, p in prompts.items()}
        await asyncio.gather(*(e.wait() for e in started.values()))
        backend.undrain("decode", 1)
        results = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
    finally:
        backend.undrain("decode", 1)
        watcher.cancel()
    await backend.refresh()
    return {
        "mode": mode,
        "tokens": {rid: r["tokens"] for rid, r in results.items()},
        "preemptions": backend.policy.decode[0].stats.num_preemptions - preempted_before,
        "migrations": backend.counters["migrations_total"] - before["migrations_total"],
        "makespan_s": max(r["end_s"] for r in results.values()) - t0,
        "p50_max_gap_s": statistics.median(r["max_gap_s"] for r in results.values()),
        "max_gap_s": max(r["max_gap_s"] for r in results.values()),
    }


def table(rounds: list[dict], load: tuple[float, float, float]) -> str:
    rows = []
    for mode in ("migrate", "preempt"):
        mine = [r for r in rounds if r["mode"] == mode]
        rows.append(
            [
                mode,
                len(mine),
                "/".join(str(r["preemptions"]) for r in mine),
                "/".join(str(r["migrations"]) for r in mine),
                f"{statistics.median(r['makespan_s'] for r in mine):.1f}",
                f"{statistics.median(r['p50_max_gap_s'] for r in mine):.2f}",
                f"{statistics.median(r['max_gap_s'] for r in mine):.2f}",
            ]
        )
    header = [
        "mode",
        "rounds",
        "preemptions (each round)",
        "migrations (each round)",
        "last stream done s (median)",
        "p50 longest wait for a token s",
        "longest wait s",
    ]
    return markdown_table(header, rows) + f"\n\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="migrate/preempt pairs (default 3)")
    parser.add_argument("--kv-backend", default="shm")
    parser.add_argument("--out", help="directory for results.json and table.md")
    args = parser.parse_args(argv)

    rounds: list[dict] = []
    # No prefix cache: a preempted request recomputes, as it would for any other prompt.
    with pinned_decoders(args.kv_backend, max_model_len=KV_TOKENS, num_blocks=KV_TOKENS // 16) as backend:
        vocab = len(backend.tokenizer) if backend.tokenizer is not None else 1000
        rng = random.Random(0)
        prompts = {f"s{i}": [rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)] for i in range(NUM_STREAMS)}

        async def go() -> None:
            reference = None
            for k in range(args.repeats):
                for mode in ("migrate", "preempt") if k % 2 == 0 else ("preempt", "migrate"):
                    r = await one_round(backend, prompts, mode, f"{k}{mode}")
                    reference = reference or r["tokens"]
                    if r["tokens"] != reference:
                        raise RuntimeError(f"round {k} ({mode}): the tokens changed")
                    log(
                        f"  {mode:7s} preemptions {r['preemptions']} migrations {r['migrations']} "
                        f"done after {r['makespan_s']:.1f} s, longest wait {r['max_gap_s']:.2f} s"
                    )
                    rounds.append({**r, "tokens": sum(len(t) for t in r["tokens"].values())})

        asyncio.run(go())
    load = os.getloadavg()
    text = table(rounds, load)
    print(text)
    write_results(args.out, {"rounds": rounds, "loadavg": load}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

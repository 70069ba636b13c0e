"""Recovery from a dead decode worker, and draining one: what is lost, what it costs.

    python -m benchmarks.recovery --out docs/bench/recovery [--events kill,drain]

One prefill and two decode workers on Ray serve NUM_STREAMS concurrent greedy streams of the
embedded model through the router (router/orchestrator.py, in this process). Rounds alternate:
a baseline round, then for each event a round in which, once every stream has its first
token, decode worker 0 is
- kill: sent SIGKILL; its streams are resumed on decode worker 1 (re-prefilling prompt plus
  the tokens they had) and Ray restarts the dead worker, which rejoins before the next round;
- drain: drained (DisaggregatedBackend.drain); its streams migrate to decode worker 1 with
  their KV (those not decoding yet are resumed as after a kill), and it is undrained after
  the round.
Per round: requests lost (ended with an error), streams whose tokens differ from the
baseline's (greedy: they must not), streams recovered, moved and migrated, end-to-end latency, the
longest pause between two deltas of a stream, and how long the killed worker took to be back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
import time

from benchmarks.common import markdown_table, write_results

NUM_STREAMS = 20
MAX_TOKENS = 64
REJOIN_TIMEOUT_S = 300.0


def log(msg: str) -> None:
    print(f"[recovery] {msg}", file=sys.stderr, flush=True)


def prompts(num: int, vocab: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"r{i}": [rng.randrange(3, vocab) for _ in range(rng.randrange(32, 97))] for i in range(num)}


async def run_round(
    backend, requests: dict[str, list[int]], tag: str, kill_pid: int | None, drain: bool = False
) -> dict:
    """Every stream's tokens, end-to-end time and longest gap; once all have started, kills
    kill_pid, or drains decode worker 0 (undrained after the round)."""
    from engine import SamplingParams
    from proto.serving import GenerateRequest

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    started = {rid: asyncio.Event() for rid in requests}

    async def stream(rid: str, prompt: list[int]) -> dict:
        tokens: list[int] = []
        start = last = time.monotonic()
        gap, error = 0.0, None
        request = GenerateRequest(f"{tag}-{rid}", tuple(prompt), params)
        async with contextlib.aclosing(backend.generate(request)) as deltas:
            async for delta in deltas:
                now = time.monotonic()
                if tokens:
                    gap = max(gap, now - last)
                last = now
                tokens += delta.token_ids
                started[rid].set()
                if delta.finish_reason == "error":
                    error = delta.error
        return {"tokens": tokens, "e2e_s": time.monotonic() - start, "max_gap_s": gap, "error": error}

    before = dict(backend.counters)
    tasks = {rid: asyncio.create_task(stream(rid, p)) for rid, p in requests.items()}
    killed_at = None
    if kill_pid is not None or drain:
        await asyncio.gather(*(e.wait() for e in started.values()))
    if kill_pid is not None:
        os.kill(kill_pid, signal.SIGKILL)
        killed_at = time.monotonic()
    if drain:
        await backend.drain("decode", 0)
    results = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
    if drain:
        backend.undrain("decode", 0)
    rejoin_s = None
    if killed_at is not None:
        deadline = time.monotonic() + REJOIN_TIMEOUT_S
        while True:
            await backend.refresh()
            if all(w.up for w in backend.workers()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the killed worker was not back within {REJOIN_TIMEOUT_S:g} s")
            await asyncio.sleep(0.2)
        rejoin_s = time.monotonic() - killed_at
    return {
        "results": results,
        "recoveries": backend.counters["recoveries_total"] - before["recoveries_total"],
        "moves": backend.counters["moves_total"] - before["moves_total"],
        "migrations": backend.counters["migrations_total"] - before["migrations_total"],
        "rejoin_s": rejoin_s,
    }


def summary(kind: str, round_: dict, baseline_tokens: dict[str, list[int]]) -> dict:
    res = round_["results"]
    return {
        "run": kind,
        "streams": len(res),
        "lost": sum(1 for r in res.values() if r["error"] is not None),
        "differ": sum(1 for rid, r in res.items() if r["tokens"] != baseline_tokens[rid]),
        "recoveries": round_["recoveries"],
        "moves": round_["moves"],
        "migrations": round_["migrations"],
        "p50_e2e_s": statistics.median(r["e2e_s"] for r in res.values()),
        "max_e2e_s": max(r["e2e_s"] for r in res.values()),
        "p50_max_gap_s": statistics.median(r["max_gap_s"] for r in res.values()),
        "max_gap_s": max(r["max_gap_s"] for r in res.values()),
        "rejoin_s": round_["rejoin_s"],
    }


def table(rows: list[dict], load: tuple[float, float, float]) -> str:
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    body = [
        [
            r["run"],
            r["streams"],
            r["lost"],
            r["differ"],
            r["recoveries"],
            r["moves"] + r["migrations"],
            r["migrations"],
            f(r["p50_e2e_s"]),
            f(r["max_e2e_s"]),
            f(r["p50_max_gap_s"], ".3f"),
            f(r["max_gap_s"], ".2f"),
            f(r["rejoin_s"], ".1f"),
        ]
        for r in rows
    ]
    header = [
        "run",
        "streams",
        "lost",
        "tokens differ",
        "recovered",
        "moved",
        "of which migrated",
        "p50 e2e s",
        "max e2e s",
        "p50 longest pause s",
        "longest pause s",
        "killed worker back after s",
    ]
    return markdown_table(header, body) + f"\n\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="baseline/kill pairs (default 3)")
    parser.add_argument("--streams", type=int, default=NUM_STREAMS)
    parser.add_argument("--kv-backend", default="shm")
    parser.add_argument("--events", default="kill", help="comma-separated, each after a baseline: kill, drain")
    parser.add_argument("--out", help="directory for results.json and table.md")
    args = parser.parse_args(argv)

    import ray

    from deploy.cluster import WorkerGroup, deploy
    from engine import EngineConfig
    from engine.default_model import ensure_default_model
    from proto.serving import Role

    model_dir = ensure_default_model()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    log(f"starting 1 prefill + 2 decode workers ({args.kv_backend}), load average {os.getloadavg()[0]:.2f}")
    dep = deploy(
        model_dir,
        [WorkerGroup(Role.PREFILL, 1), WorkerGroup(Role.DECODE, 2)],
        EngineConfig(),
        kv_backend=args.kv_backend,
        model_name="tandem-default",
        local_prefill_tokens=0,
        pin_cores=False,
        max_restarts=-1,
    )
    rows: list[dict] = []
    try:
        tokenizer = dep.backend.tokenizer
        vocab = len(tokenizer) if tokenizer is not None else 256
        requests = prompts(args.streams, vocab)
        victim = dep.decode_actors[0]

        async def go() -> None:
            log("warm-up round")
            warm = await run_round(dep.backend, requests, "warm", None)
            baseline_tokens = {rid: r["tokens"] for rid, r in warm["results"].items()}
            kinds = {"kill": "kill -9 decode 0", "drain": "drain decode 0"}
            events = args.events.split(",")
            if not set(events) <= set(kinds):
                raise SystemExit(f"--events: each must be one of {sorted(kinds)}, got {args.events!r}")
            for k in range(args.rounds):
                for event in events:
                    for kind in ("baseline", kinds[event]):
                        pid = None
                        if kind.startswith("kill"):
                            pid = ray.get(victim.__ray_call__.remote(lambda _self: os.getpid()))
                        log(f"round {k + 1}: {kind}")
                        round_ = await run_round(
                            dep.backend, requests, f"{k}-{len(rows)}", pid, drain=kind.startswith("drain")
                        )
                        rows.append(summary(kind, round_, baseline_tokens))
                        log(f"  {rows[-1]}")

        asyncio.run(go())
    finally:
        dep.shutdown()
        ray.shutdown()
    load = os.getloadavg()
    text = table(rows, load)
    print(text)
    write_results(args.out, {"rows": rows, "loadavg": load}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

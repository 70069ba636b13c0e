"""What the router and the worker seam cost, beside the engine alone.

    python -m benchmarks.seam --out docs/bench/seam

Each server runs in its own process on core 0 (affinity and one thread); the load generator
(aiohttp, streaming OpenAI completions) runs on core 1. Setups:
- engine alone: LLMEngine on the embedded model stepping the same requests, no server;
- router alone: the real frontends and orchestrator in front of an instant decode client
  (every token is ready at once), so all time is the router's (HTTP, validation, tokenizing,
  orchestration, per-token streaming);
- colocated: `tandem serve --colocated` (router and engine in one process);
- disaggregated: `tandem serve` on Ray (router, a prefill and a decode worker: on two cores
  they share them with the load generator, which the table says);
- disaggregated decode-tp2: the same with a decode worker of two tensor-parallel ranks
  (what the ranks' control traffic costs: registrations, settlements).
Figures: requests per second with max_tokens 1 (dispatch) at each concurrency, the median
request latency, and with max_tokens 64 the tokens streamed per second and the median gap
between a stream's tokens. The router's added latency per request is router-alone's p50 at
concurrency 1; per token, its median token gap.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import write_results
from engine.cores import thread_env

PROMPT = [5, 9, 12, 7, 30, 41, 8, 3]  # 8 tokens of the embedded model's vocabulary
SERVER_CORE, CLIENT_CORE = 0, 1


def log(message: str) -> None:
    print(f"[seam] {message}", file=sys.stderr, flush=True)


# ---- the instant decode client: the router's own cost, with no worker behind it ----------


class InstantDecode:
    """A DecodeClient whose tokens are ready at once (one delta per token, as a worker sends)."""

    async def reserve(self, request):
        raise RuntimeError("the instant client prefills locally only")

    def admit(self, request_id, first_token_id):
        raise RuntimeError("the instant client prefills locally only")

    async def generate(self, request):
        from proto.serving import FinishReason, TokenDelta

        n = request.params.max_tokens
        for i in range(n):
            last = i == n - 1
            yield TokenDelta(
                request.request_id,
                (65,),
                "a",
                last,
                FinishReason.LENGTH if last else None,
                len(request.prompt_token_ids),
                0,
            )

    async def abort(self, request_id):
        return None

    async def detach(self, request_id):
        raise ValueError("the instant client's requests do not migrate")

    async def migrate_out(self, request_id, handle):
        raise RuntimeError("the instant client's requests do not migrate")

    def reattach(self, request_id):
        raise ValueError("the instant client's requests do not migrate")

    async def stats(self):
        from router.policy import IDLE

        return IDLE

    async def take_steps(self):
        return []  # it runs no engine


async def _serve_instant(port: int) -> None:
    from engine.default_model import ensure_default_model
    from router.orchestrator import DisaggregatedBackend
    from router.server import serve

    model_dir = ensure_default_model()
    backend = DisaggregatedBackend(
        model_dir,
        [],
        [InstantDecode()],
        model_name=Path(model_dir).name,
        max_model_len=1024,
        block_size=16,
        kv_bytes_per_token=1,
        local_prefill_tokens=10**6,
    )
    handle = await serve(backend, http_port=port, grpc_port=0)
    log(f"instant router on :{handle.http_port}")
    await asyncio.Event().wait()


# ---- the load generator ---------------------------------------------------------------------


async def _one(session, url: str, model: str, max_tokens: int) -> tuple[float, list[float]] | None:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    stamps = []
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            return None
        async for line in resp.content:
            if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                stamps.append(time.perf_counter())
    return time.perf_counter() - start, [b - a for a, b in itertools.pairwise(stamps)]


async def _load(url: str, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(f"{url}/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        for _ in range(min(concurrency, 16)):  # warm-up: connections, first-call costs
            await _one(session, url, model, max_tokens)
        queue = iter(range(num_requests))
        latencies, gaps, failed = [], [], 0

        async def worker():
            nonlocal failed
            for _ in queue:
                result = await _one(session, url, model, max_tokens)
                if result is None:
                    failed += 1
                else:
                    latencies.append(result[0])
                    gaps.extend(result[1])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    done = len(latencies)
    return {
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "requests": done,
        "failed": failed,
        "requests_per_s": done / wall,
        "tokens_per_s": done * max_tokens / wall,
        "p50_latency_ms": statistics.median(latencies) * 1e3 if latencies else None,
        "p50_token_gap_ms": statistics.median(gaps) * 1e3 if gaps else None,
    }


def _client(url: str, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    """Run the load generator in its own process on CLIENT_CORE; returns its figures."""
    code = (
        f"import asyncio, json, os; os.sched_setaffinity(0, {{{CLIENT_CORE}}}); "
        f"from benchmarks.seam import _load; "
        f"print(json.dumps(asyncio.run(_load({url!r}, {concurrency}, {num_requests}, {max_tokens}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- servers -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], port: int, pin: bool) -> subprocess.Popen:
    env = {**os.environ, **thread_env(1), "PYTHONUNBUFFERED": "1"}
    preexec = (lambda: os.sched_setaffinity(0, {SERVER_CORE})) if pin else None
    errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server must never block on it
    proc = subprocess.Popen(
        argv, env=env, preexec_fn=preexec, start_new_session=True, stdout=subprocess.DEVNULL, stderr=errors
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            errors.seek(0)
            raise RuntimeError(f"server exited: {errors.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise TimeoutError("server did not become healthy in 300 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _serve(*flags: str):
    """argv of `tandem serve` on a given HTTP port, with these flags."""
    return lambda port: [
        sys.executable,
        "-m",
        "deploy.cli",
        "serve",
        "--http-port",
        str(port),
        "--grpc-port",
        "0",
        *flags,
    ]


SETUPS = {
    "router alone": (lambda port: [sys.executable, "-m", "benchmarks.seam", "--serve-instant", str(port)], True),
    "colocated": (_serve("--colocated"), True),
    # Ray places its workers itself (one core each); the router shares the machine with them.
    "disaggregated": (_serve("--local-prefill-tokens", "0"), False),
    "disaggregated decode-tp2": (_serve("--local-prefill-tokens", "0", "--decode-tp", "2"), False),
}


def engine_alone(num_requests: int, concurrency: int, max_tokens: int) -> dict:
    """The engine stepping the same requests with no server: the floor for every setup."""
    code = (
        f"import json, os; os.sched_setaffinity(0, {{{SERVER_CORE}}}); "
        f"from benchmarks.seam import _engine_alone; "
        f"print(json.dumps(_engine_alone({num_requests}, {concurrency}, {max_tokens})))"
    )
    env = {**os.environ, **thread_env(1)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _engine_alone(num_requests: int, concurrency: int, max_tokens: int) -> dict:
    from engine import EngineConfig, SamplingParams
    from engine.default_model import ensure_default_model
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(ensure_default_model(), EngineConfig(max_num_seqs=concurrency, enable_prefix_caching=False))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("warm", PROMPT, params)
    while engine.has_unfinished():
        engine.step()
    start = time.perf_counter()
    next_id, steps = 0, []
    while next_id < num_requests or engine.has_unfinished():
        while next_id < num_requests and len(engine.requests) < concurrency:
            engine.add_request(f"r{next_id}", PROMPT, params)
            next_id += 1
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "requests": num_requests,
        "failed": 0,
        "requests_per_s": num_requests / wall,
        "tokens_per_s": num_requests * max_tokens / wall,
        "p50_latency_ms": None,
        "p50_token_gap_ms": statistics.median(steps) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-instant", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=2000, help="requests per point (default 2000)")
    parser.add_argument("--stream-requests", type=int, default=512, help="requests per streaming point")
    parser.add_argument("--concurrency", default="1,64,256")
    parser.add_argument("--setups", default=",".join(["engine alone", *SETUPS]))
    parser.add_argument("--out", help="directory for results.json and table.md")
    args = parser.parse_args(argv)
    if args.serve_instant is not None:
        asyncio.run(_serve_instant(args.serve_instant))
        return 0
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for name in args.setups.split(","):
        points = [(c, args.requests, 1) for c in concurrencies] + [
            (c, args.stream_requests, 64) for c in concurrencies if c > 1
        ]
        if name == "engine alone":
            for c, n, t in points:
                log(f"{name}: concurrency {c}, max_tokens {t}")
                rows.append({"setup": name, **engine_alone(n, c, t)})
            continue
        make_argv, pin = SETUPS[name]
        port = _free_port()
        log(f"starting {name} on :{port}")
        proc = _start(make_argv(port), port, pin)
        try:
            for c, n, t in points:
                log(f"{name}: concurrency {c}, max_tokens {t}, {n} requests")
                rows.append({"setup": name, **_client(f"http://127.0.0.1:{port}", c, n, t)})
        finally:
            _stop(proc)
    load = os.getloadavg()
    table = _table(rows, load)
    print(table)
    write_results(args.out, {"rows": rows, "loadavg": load}, table)
    return 0


def _table(rows: list[dict], load) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [
        "| setup | concurrency | max_tokens | requests/s | tokens/s | p50 latency ms | p50 token gap ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['concurrency']} | {r['max_tokens']} | {r['requests_per_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {fmt(r['p50_latency_ms'], '.1f')} | "
            f"{fmt(r['p50_token_gap_ms'], '.2f')} | {r['failed']} |"
        )
    lines.append(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

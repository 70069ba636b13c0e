"""`tandem serve` and `tandem demo`: start workers on Ray, put the router in front."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from kv_transfer.registry import backend_names
from router.policy import POLICIES


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve a model: prefill and decode workers behind gRPC and HTTP")
    _serving_args(serve)
    serve.add_argument("--http-port", type=int, default=8000, help="OpenAI HTTP port (default 8000; 0 = any)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port (default 8001; 0 = any)")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require this key (Authorization: Bearer KEY; gRPC metadata authorization); "
        "repeat for several; also read from $TANDEM_API_KEY (comma-separated)",
    )
    serve.add_argument("--public-metrics", action="store_true", help="serve /metrics without a key")
    serve.add_argument("--ssl-certfile", help="PEM certificate: serve both APIs over TLS")
    serve.add_argument("--ssl-keyfile", help="PEM private key of --ssl-certfile")
    serve.add_argument("--ssl-ca-certs", help="PEM CA bundle: require client certificates it signed (mTLS)")
    serve.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds running requests may finish before they are cut (default 10)",
    )
    serve.set_defaults(run=_serve, local_prefill_tokens=32)

    demo = subparsers.add_parser("demo", help="serve the default model, answer one request over HTTP, stop")
    _serving_args(demo)
    demo.add_argument("--prompt", default="Once upon a time,")
    # Every prompt goes through a prefill worker and a KV transfer, however short.
    demo.set_defaults(run=_demo, local_prefill_tokens=0)


def _serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: the embedded model)")
    p.add_argument("--model-name", help="name clients use (default: the directory name)")
    p.add_argument("--plan", help="plan file from `tandem plan`: workers, GPU types, batch limits")
    p.add_argument("--num-prefill", type=int, default=1, help="prefill workers without a plan (default 1)")
    p.add_argument("--num-decode", type=int, default=1, help="decode workers without a plan (default 1)")
    p.add_argument(
        "--prefill-tp",
        type=int,
        default=1,
        help="tensor-parallel size of each prefill worker without a plan (default 1)",
    )
    p.add_argument(
        "--decode-tp", type=int, default=1, help="tensor-parallel size of each decode worker without a plan (default 1)"
    )
    for role in ("prefill", "decode"):
        p.add_argument(
            f"--{role}-pp",
            type=int,
            default=1,
            help=f"pipeline stages of each {role} worker without a plan (default 1); a worker is tp x pp ranks",
        )
    p.add_argument("--colocated", action="store_true", help="one engine doing both phases, no Ray")
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        metavar="N",
        help="CPU workers: N cores of their own per rank (refused when the machine has too few); "
        "default: one core each when there are enough, else shared",
    )
    p.add_argument("--prefill-cpus", type=int, metavar="N", help="cores per prefill rank (overrides --cpus-per-worker)")
    p.add_argument("--decode-cpus", type=int, metavar="N", help="cores per decode rank (overrides --cpus-per-worker)")
    p.add_argument(
        "--kv-backend", choices=backend_names(), help="KV transfer backend (default: nixl when installed, else shm)"
    )
    p.add_argument("--routing", default="load", choices=POLICIES)
    p.add_argument(
        "--local-prefill-tokens",
        type=int,
        help="prompts with at most this many uncached tokens prefill on the decode worker (serve: default 32; demo: 0)",
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int)
    auto = p.add_argument_group(
        "online P:D rebalancing",
        "--autoscale: every worker can change role while serving (same weights, no reload; one rank "
        "each), and a controller moves workers between prefill and decode as the load shifts, by the "
        "planner's capacity model over the workers' latency profile (router/rebalance.py)",
    )
    auto.add_argument("--autoscale", action="store_true", help="rebalance the prefill:decode split online")
    auto.add_argument(
        "--autoscale-profile", metavar="PROFILE", help="the workers' latency profile (`tandem profile`); required"
    )
    auto.add_argument("--slo-ttft-s", type=float, default=2.0, help="TTFT target the split is sized for (default 2)")
    auto.add_argument("--slo-tpot-s", type=float, default=0.2, help="TPOT target the split is sized for (default 0.2)")
    auto.add_argument("--autoscale-interval-s", type=float, default=5.0, help="seconds between evaluations (default 5)")
    auto.add_argument(
        "--autoscale-cooldown-s", type=float, default=30.0, help="seconds after a change before the next (default 30)"
    )
    auto.add_argument(
        "--autoscale-window-s", type=float, default=60.0, help="seconds of load each evaluation looks at (default 60)"
    )


CPU_DEVICE = "cpu"  # the planner's device type for one CPU core


def _default_kv_backend() -> str:
    """nixl where it can run (its own check: the CUDA-specific wheels install no `nixl`), else shm."""
    from kv_transfer import load_backend

    return "nixl" if load_backend("nixl").unavailable_reason("cpu") is None else "shm"


def _start_local_ray(host: str, num_cpus: int) -> None:
    """A Ray cluster on this machine only. With a loopback --host its services and metrics
    endpoints stay on loopback too: Ray binds them to the node's address, and its single-machine
    mode (the one it uses on macOS and Windows) makes that 127.0.0.1."""
    from router.security import is_loopback

    if is_loopback(host):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by Ray and by the processes it starts
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the variable was set
    import ray

    # "local": a new cluster even if a stale address file (a `ray start` that crashed) names one.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def security_from(args: argparse.Namespace, log=print):
    """The API keys and TLS the flags ask for; warns when an open API faces the network."""
    from router.security import Security, is_loopback

    security = Security.from_keys(
        args.api_key,
        public_metrics=args.public_metrics,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_ca_certs=args.ssl_ca_certs,
    )
    if not security.api_keys and not is_loopback(args.host):
        log(
            f"WARNING: serving on {args.host} without an API key: anyone who can reach it may use it "
            f"(--api-key or $TANDEM_API_KEY to require one)"
        )
    return security


def start_backend(args: argparse.Namespace, log=print):
    """The backend the flags ask for, and a function that stops it."""
    from engine import EngineConfig
    from engine.cores import available_cores, bind_cores
    from engine.default_model import ensure_default_model

    if args.plan:
        from proto.plan import Plan

        plan = Plan.load(args.plan)
        plan.check_servable()
        model_dir = args.model or plan.model.path or ensure_default_model(log)
    else:
        plan = None
        model_dir = args.model or ensure_default_model(log)
    model_name = args.model_name or Path(model_dir).name
    engine_config = EngineConfig(
        dtype=args.dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
    )
    autoscale = getattr(args, "autoscale", False)
    if autoscale:
        rebalancer_inputs(args)  # a bad profile or SLO fails before anything starts
    if args.colocated:
        if autoscale:
            raise ValueError("--autoscale rebalances prefill and decode workers: it does not apply to --colocated")
        from router.local_backend import LocalBackend

        backend = LocalBackend(model_dir, engine_config, model_name)
        log(f"colocated engine on {model_name}")
        return backend, backend.close

    import ray

    from deploy.cluster import WorkerGroup, deploy, describe
    from proto.serving import Role

    cpus = {
        role: getattr(args, f"{role}_cpus", None) or getattr(args, "cpus_per_worker", None)
        for role in ("prefill", "decode")
    }
    if plan is not None and plan.stages:
        groups = chain_groups(plan, cpus)
    elif plan is not None:
        # A plan made for CPU cores (gpu_type "cpu": each device is a core) runs CPU workers,
        # a core per device; any other GPU type asks Ray for that GPU.
        groups = [
            WorkerGroup(
                Role(g.role),
                g.count,
                g.tp,
                g.pp,
                None if g.gpu_type == CPU_DEVICE else g.gpu_type,
                num_cpus=cpus[g.role] or 1,
                max_num_seqs=g.max_batch_size,
                max_num_batched_tokens=g.max_batched_tokens,
            )
            for g in plan.groups
        ]
    else:
        groups = [
            WorkerGroup(
                Role.PREFILL, args.num_prefill, args.prefill_tp, args.prefill_pp, num_cpus=cpus["prefill"] or 1
            ),
            WorkerGroup(Role.DECODE, args.num_decode, args.decode_tp, args.decode_pp, num_cpus=cpus["decode"] or 1),
        ]
    started_ray = not ray.is_initialized()
    if started_ray and os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, log_to_driver=False)  # joins the cluster
    elif started_ray:
        # A local cluster: at least a CPU per worker rank, however few cores (they share them).
        ranks = sum(g.count * g.ranks * int(g.num_cpus) for g in groups)
        _start_local_ray(getattr(args, "host", "127.0.0.1"), max(len(available_cores()), ranks))
    on_cpus = plan is not None and {g.gpu_type for g in plan.groups} | {s.gpu_type for s in plan.stages} == {CPU_DEVICE}
    if ray.cluster_resources().get("GPU", 0) > 0 and not on_cpus:
        groups = [replace(g, use_gpus=True) for g in groups]
    kv_backend = args.kv_backend or _default_kv_backend()
    log(f"starting workers ({describe(groups)}) of {model_name} (KV transfer: {kv_backend}) ...")
    explicit = any(cpus.values())
    deployment = deploy(
        model_dir,
        groups,
        engine_config,
        kv_backend=kv_backend,
        model_name=model_name,
        policy=args.routing,
        local_prefill_tokens=args.local_prefill_tokens,
        pin_cores=True if explicit else None,
        elastic=autoscale,
    )
    labels = [f"{g.role} {i}" for g in groups for i in range(g.count)]
    if deployment.cores is not None and deployment.cores.describe(labels):
        log("CPU cores:\n" + deployment.cores.describe(labels))
        if deployment.cores.router:
            bind_cores(deployment.cores.router)  # the router's own: it never competes with a worker

    def stop():
        deployment.shutdown()
        if started_ray:
            ray.shutdown()

    return deployment.backend, stop


def chain_groups(plan, cpus: dict[str, float | None]) -> list:
    """A layer-split plan's workers: one pipeline worker per chain of stages (proto.plan
    layer_chains), a stage per node with that node's layers and GPU type. Stages in no chain
    stay idle (the plan warned of them)."""
    from deploy.cluster import WorkerGroup
    from proto.plan import layer_chains
    from proto.serving import Role

    chains, _ = layer_chains(plan.stages, plan.model.num_layers)
    return [
        WorkerGroup(
            Role(c.role),
            1,
            c.tp,
            len(c.stages),
            num_cpus=cpus[c.role] or 1,
            pipeline_layers=c.layers,
            stage_gpu_types=tuple(None if s.gpu_type == CPU_DEVICE else s.gpu_type for s in c.stages),
        )
        for c in chains
    ]


def rebalancer_inputs(args: argparse.Namespace):
    """(latency coefficients, SLO) of --autoscale, or ValueError naming the flag."""
    from planner.latency.roofline import Profile
    from proto.slo import SLOSpec

    if not args.autoscale_profile:
        raise ValueError(
            "--autoscale needs the workers' latency profile: run `tandem profile --model M --out profile.yaml` "
            "on one worker's hardware, then pass --autoscale-profile profile.yaml"
        )
    profile = Profile.load(args.autoscale_profile)
    entries = [e for e in profile.entries if (e.tp, e.pp) == (1, 1)]
    if len(entries) != 1:
        named = ", ".join(f"{e.gpu_type} tp {e.tp} pp {e.pp}" for e in profile.entries)
        raise ValueError(f"--autoscale-profile needs exactly one entry with tp 1 and pp 1, it has: {named}")
    slo = SLOSpec(ttft_s=args.slo_ttft_s, tpot_s=args.slo_tpot_s)
    return entries[0].coefficients, slo


async def start_rebalancer(args: argparse.Namespace, backend, log=print):
    """--autoscale's controller, running on the current event loop (None without --autoscale)."""
    if not getattr(args, "autoscale", False):
        return None
    from router.rebalance import RebalanceConfig, Rebalancer

    coeffs, slo = rebalancer_inputs(args)
    config = RebalanceConfig(
        interval_s=args.autoscale_interval_s, window_s=args.autoscale_window_s, cooldown_s=args.autoscale_cooldown_s
    )
    rebalancer = Rebalancer(backend, coeffs, slo, config=config)  # KV size from the workers' stats
    rebalancer.start()
    decisions = logging.getLogger("router.rebalance")
    if not decisions.handlers and not logging.getLogger().handlers:  # nobody set logging up: to stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        decisions.addHandler(handler)
        decisions.setLevel(logging.INFO)
    log(f"rebalancing the prefill:decode split online for {slo.describe()} (router/rebalance.py)")
    return rebalancer


def _serve(args: argparse.Namespace) -> int:
    from router.server import serve

    security = security_from(args)  # bad key or certificate settings fail before anything starts
    backend, stop_backend = start_backend(args)

    async def main():
        handle = await serve(
            backend, http_port=args.http_port, grpc_port=args.grpc_port, host=args.host, security=security
        )
        rebalancer = await start_rebalancer(args, backend)
        scheme = "https" if security.tls else "http"
        access = (f"{len(security.api_keys)} API key(s)" if security.api_keys else "no API key") + (
            ", TLS" + (" with client certificates" if security.ssl_ca_certs else "") if security.tls else ""
        )
        print(
            f"Tandem is serving {backend.model_name} ({access})\n"
            f"  OpenAI HTTP:  {scheme}://{args.host}:{handle.http_port}/v1  (health /health, metrics /metrics)\n"
            f"  KServe gRPC:  {args.host}:{handle.grpc_port}  (inference.GRPCInferenceService)\n"
            f"Ctrl-C or SIGTERM stops it.",
            flush=True,
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        print(f"draining (up to {args.shutdown_grace_s:g} s) ...", flush=True)
        if rebalancer is not None:
            await rebalancer.stop()
        await handle.stop(grace_s=args.shutdown_grace_s)

    try:
        asyncio.run(main())
    finally:
        stop_backend()
    print("stopped", flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from router.server import serve

    backend, stop_backend = start_backend(args)

    async def main():
        handle = await serve(backend, http_port=0, grpc_port=0, host="127.0.0.1")
        url = f"http://127.0.0.1:{handle.http_port}/v1/completions"
        body = {"model": backend.model_name, "prompt": args.prompt, "max_tokens": 48, "temperature": 0}
        print(f"POST {url}\n{json.dumps(body)}", flush=True)
        start = time.monotonic()
        answer = await asyncio.to_thread(_post_json, url, body)
        elapsed = time.monotonic() - start
        print(
            f"\n>>> {args.prompt}{answer['choices'][0]['text']}\n"
            f"    [{answer['usage']['completion_tokens']} tokens in {elapsed:.2f}s, "
            f"finish_reason={answer['choices'][0]['finish_reason']}]",
            flush=True,
        )
        stats = backend.stats()
        if "kv_transfers_total" in stats:
            print(
                f"    served disaggregated: {stats['kv_transfers_total']} KV transfer(s), "
                f"{stats['kv_transfer_bytes_total'] / 1024:.0f} KiB of KV moved prefill -> decode",
                flush=True,
            )
        await handle.stop(grace_s=1.0)

    try:
        asyncio.run(main())
    finally:
        stop_backend()
    return 0


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())

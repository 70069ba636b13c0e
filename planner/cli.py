"""`tandem plan` and `tandem profile`.

    tandem plan --cluster cluster.yaml --model llama-2-13b --workload workload.yaml --slo slo.yaml
    tandem plan latency --model llama-2-13b --gpu A100-80GB --tp 2 --prefill-tokens 1024
    tandem profile --model /models/tiny --out profile.yaml

Progress goes to stderr; the table (or, with --emit json, the plan as JSON) to stdout; the
plan file to --out. Heavy imports (numpy, PuLP, the engine) happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from planner.latency import cli as latency_cli


def register(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="choose prefill/decode instances and their placement on a GPU cluster (MILP)",
        description="Plan how many prefill and decode instances of which GPU type, TP and PP to run "
        "on which nodes, to serve the most requests within the SLO (or a rate at least cost).",
    )
    # Required unless a subcommand (`tandem plan latency`) runs instead: plan_inputs checks them.
    plan.add_argument("--cluster", help="cluster YAML (nodes, GPUs, network); required")
    plan.add_argument(
        "--model", help="architecture name (e.g. llama-2-13b), checkpoint directory, config.json or YAML; required"
    )
    plan.add_argument("--workload", help="workload YAML (rate and lengths, or a trace); required")
    plan.add_argument("--slo", help="SLO YAML (TTFT/TPOT targets, percentiles, attainment); required")
    plan.add_argument(
        "--objective",
        choices=("goodput", "cost"),
        default="goodput",
        help="goodput: most requests/s on the cluster; cost: least $/h for --target-rate",
    )
    plan.add_argument("--target-rate", type=float, help="requests/s for --objective cost (default: workload rate)")
    plan.add_argument("--profile", help="profile YAML from `tandem profile` or fitted coefficients")
    plan.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="override the model's dtype")
    plan.add_argument(
        "--layer-split",
        action="store_true",
        help="split layers over nodes (Helix-style) for models that fit no single node",
    )
    plan.add_argument("--out", default="plan.yaml", help="plan file to write (.yaml or .json; default plan.yaml)")
    plan.add_argument("--emit", choices=("table", "json"), default="table", help="stdout format")
    plan.add_argument("--time-limit", type=float, default=60.0, help="solver time limit, s (default 60)")
    plan.add_argument("--gap", type=float, default=0.005, help="relative gap to stop at (default 0.005)")
    plan.add_argument("--threads", type=int, default=2, help="solver threads (default 2)")
    plan.add_argument("--solver", choices=("auto", "highs", "cbc"), default="auto")
    plan.add_argument(
        "--sim-requests",
        type=int,
        default=2000,
        help="requests to simulate the plan with; 0 skips simulation (default 2000)",
    )
    plan.add_argument(
        "--no-goodput-search",
        action="store_true",
        help="simulate at the planned rate only, not the bisection for simulated goodput (and, "
        "unless --calibrate-rounds says otherwise, no calibration)",
    )
    plan.add_argument(
        "--calibrate-rounds",
        type=int,
        help="at most this many rounds of calibrating the capacity model by simulating the "
        "MILP's placement, then solving again; stops when the MILP proposes a placement "
        "already simulated (default 3, or 0 with --no-goodput-search; 0 plans with the "
        "model's own capacities)",
    )
    plan.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    plan.add_argument(
        "--max-pp",
        type=int,
        default=8,
        choices=(1, 2, 4, 8),
        help="pipeline stages per instance at most (default 8). A pp instance is forecast as "
        "the engine serves it: one step at a time, its micro-batches filling the stages in "
        "turn, so pp buys memory (a model or KV that fits no fewer GPUs) more than speed",
    )
    plan.set_defaults(run=run_plan)
    latency_cli.register(plan)

    profile = subparsers.add_parser(
        "profile",
        help="measure the engine on this machine and write latency coefficients",
        description="Run the real engine on the local device over a grid of prompt lengths and decode "
        "batches, fit prefill and decode coefficients, and write a profile for `tandem plan`.",
    )
    profile.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    profile.add_argument("--out", default="profile.yaml", help="profile file to write")
    profile.add_argument("--gpu-type", help="GPU type to file the measurements under (default: detected)")
    profile.add_argument("--dtype", default="auto", help="float32 | float16 | bfloat16 | auto")
    profile.add_argument("--device", default="auto", help="cpu | cuda | auto")
    profile.add_argument(
        "--cores",
        type=int,
        help="CPU only: compute on this many cores, as many threads (default 1 when the entry "
        "is filed under gpu_type cpu, which is one core)",
    )
    profile.add_argument("--repeats", type=int, default=3, help="runs per point; the median is kept")
    profile.add_argument(
        "--prefill-tokens", default="16,32,64,128,256,512", help="prompt lengths to time (comma-separated)"
    )
    profile.add_argument("--decode-batches", default="1,2,4,8,16", help="decode batch sizes to time")
    profile.add_argument("--decode-contexts", default="64,256", help="prompt lengths behind the decode batches")
    served = profile.add_argument_group(
        "refit to what a server ran",
        "instead of timing the engine here: refit a profile entry to the steps a running server's "
        "workers ran (the JSON that POST /admin/steps answers; see docs/planner.md)",
    )
    served.add_argument("--from-steps", metavar="STEPS_JSON", help="the answer of POST /admin/steps, saved")
    served.add_argument("--base", metavar="PROFILE", help="the profile to refit (with --from-steps)")
    served.add_argument("--tp", type=int, default=1, help="with --gpu-type: the entry's tensor parallelism (default 1)")
    served.add_argument("--pp", type=int, default=1, help="with --gpu-type: the entry's pipeline stages (default 1)")
    profile.set_defaults(run=run_profile)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plan_inputs(args: argparse.Namespace):
    """Read and validate the four input files and the options into PlanInputs."""
    from planner.latency.gpus import GPU_TYPES
    from planner.latency.models import resolve_model
    from planner.latency.roofline import Profile
    from planner.problem import PlanInputs
    from planner.simulate.workload import WorkloadSpec
    from proto.cluster import ClusterSpec
    from proto.slo import SLOSpec

    missing = [f"--{name}" for name in ("cluster", "model", "workload", "slo") if getattr(args, name) is None]
    if missing:
        raise ValueError(
            f"the following arguments are required: {', '.join(missing)} "
            f"(or `tandem plan latency` for the latency of one step)"
        )
    if args.target_rate is not None and args.target_rate <= 0:
        raise ValueError(f"--target-rate must be positive, got {args.target_rate}")
    if args.block_size <= 0 or args.block_size & (args.block_size - 1):
        raise ValueError(f"--block-size must be a positive power of two, got {args.block_size}")
    return PlanInputs(
        cluster=ClusterSpec.load(args.cluster, GPU_TYPES),
        model=resolve_model(args.model, args.dtype),
        workload=WorkloadSpec.load(args.workload),
        slo=SLOSpec.load(args.slo),
        objective=args.objective,
        target_rps=args.target_rate,
        profile=Profile.load(args.profile) if args.profile else None,
        block_size=args.block_size,
        max_pp=args.max_pp,
    )


def run_plan(args: argparse.Namespace) -> int:
    from planner.planning import CALIBRATION_ROUNDS, make_layer_plan, make_plan
    from planner.report import format_plan
    from planner.solve.solver import SolveOptions

    inputs = plan_inputs(args)
    rounds = args.calibrate_rounds
    if rounds is None:  # calibration runs goodput searches: not when the user declined one
        rounds = 0 if args.no_goodput_search else CALIBRATION_ROUNDS
    if args.gap < 0 or args.threads < 1 or args.sim_requests < 0 or rounds < 0:
        raise ValueError("--gap must be >= 0, --threads >= 1, --sim-requests >= 0 and --calibrate-rounds >= 0")
    options = SolveOptions(time_limit_s=args.time_limit, gap_rel=args.gap, threads=args.threads, solver=args.solver)
    if args.layer_split:
        plan = make_layer_plan(inputs, options, _progress)
    else:
        plan = make_plan(
            inputs,
            options,
            num_sim_requests=args.sim_requests,
            search_goodput=not args.no_goodput_search,
            progress=_progress,
            calibration_rounds=rounds,
        )
    plan.save(args.out)
    _progress(f"wrote {args.out}")
    if args.emit == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0


def run_refit(args: argparse.Namespace) -> int:
    """tandem profile --from-steps: the base profile with one entry refitted to served steps."""
    from planner.latency.profile import describe_refit, refit_profile
    from planner.latency.roofline import Profile
    from proto.schema import load_document
    from proto.serving import StepRecord

    if args.base is None:
        raise ValueError("--from-steps needs --base: the profile whose entry is refitted")
    data = load_document(args.from_steps, "steps")
    names = [f.name for f in fields(StepRecord)]
    known = (names, names[:-1])  # a server from before steps recorded their start (at_s)
    if not isinstance(data, dict) or data.get("fields") not in known or not isinstance(data.get("workers"), list):
        raise ValueError(
            f"{args.from_steps}: not what POST /admin/steps answers (an object with 'fields' {names} and 'workers')"
        )
    steps: dict[str, list[StepRecord]] = {"prefill": [], "decode": [], "colocated": []}
    for i, worker in enumerate(data["workers"]):
        role = worker.get("role") if isinstance(worker, dict) else None
        if role not in steps:
            raise ValueError(f"{args.from_steps}: workers[{i}].role must be one of {sorted(steps)}, got {role!r}")
        try:
            steps[role] += [StepRecord(*row) for row in worker.get("steps", [])]
        except TypeError:
            raise ValueError(f"{args.from_steps}: workers[{i}].steps must be rows of {len(names)} numbers") from None
    # A colocated engine's steps are fitted for both kinds (mixed steps are left out).
    prefill, decode = steps["prefill"] + steps["colocated"], steps["decode"] + steps["colocated"]
    profile, report = refit_profile(Profile.load(args.base), prefill, decode, args.gpu_type, args.tp, args.pp)
    profile.save(args.out)
    entry = next(e for e in profile.entries if args.gpu_type in (None, e.gpu_type))
    print(f"{profile.model} on {entry.gpu_type}: {describe_refit(report, entry.coefficients)}; wrote {args.out}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from planner.latency.profile import profile_engine

    if args.from_steps is not None:
        return run_refit(args)

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.cores is not None and args.cores < 1:
        raise ValueError(f"--cores must be >= 1, got {args.cores}")
    grid = {}
    for flag in ("prefill_tokens", "decode_batches", "decode_contexts"):
        try:
            grid[flag] = tuple(int(v) for v in getattr(args, flag).split(","))
        except ValueError:
            raise ValueError(
                f"--{flag.replace('_', '-')} must be comma-separated integers, got {getattr(args, flag)!r}"
            ) from None
        if min(grid[flag]) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} values must be positive")
    profile = profile_engine(
        args.model,
        gpu_type=args.gpu_type,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
        cores=args.cores,
        progress=_progress,
        **grid,
    )
    profile.save(args.out)
    entry = profile.entries[0]
    c = entry.coefficients
    print(
        f"{profile.model} on {entry.gpu_type}: prefill ms = {c.a:.3g} + {c.b:.3g} T + {c.c:.3g} T^2; "
        f"decode ms = {c.A:.3g} + {c.B:.3g} K + {c.C:.3g} batch; wrote {args.out}"
    )
    return 0

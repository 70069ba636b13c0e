"""`tandem plan latency`: what the latency model predicts for one step of one instance.

    tandem plan latency --model llama-2-13b --gpu A100-80GB --tp 2 --prefill-tokens 1024
    tandem plan latency --model llama-2-13b --gpu A100-80GB --tp 2 --decode-batch 32 --context 1500 --emit json

It prints the step time and where it came from: the profile's entry for the exact
(GPU type, tp, pp) when --profile has one, the roofline otherwise; --emit json adds the
coefficients in a profile entry's layout.
"""

from __future__ import annotations

import argparse
import json


def register(plan: argparse.ArgumentParser) -> None:
    """Add `latency` as a subcommand of `tandem plan`."""
    subcommands = plan.add_subparsers(dest="plan_command", metavar="{latency}")
    latency = subcommands.add_parser(
        "latency",
        help="predicted time of one prefill or decode step of one instance",
        description="Print the predicted time of one prefill step (a prompt of --prefill-tokens) or one "
        "decode step (--decode-batch sequences of --context tokens each) of one instance, and "
        "whether it came from --profile or the roofline.",
    )
    latency.add_argument(
        "--model", required=True, help="architecture name (e.g. llama-2-13b), checkpoint directory, config.json or YAML"
    )
    latency.add_argument("--gpu", required=True, help="GPU type from the planner's table, e.g. A100-80GB")
    latency.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (default 1)")
    latency.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    step = latency.add_mutually_exclusive_group(required=True)
    step.add_argument("--prefill-tokens", type=int, help="tokens of the prompt of a prefill step")
    step.add_argument("--decode-batch", type=int, help="sequences in a decode step (with --context)")
    latency.add_argument("--context", type=int, help="context tokens of each sequence of the decode step")
    latency.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="override the model's dtype")
    latency.add_argument("--profile", help="profile YAML from `tandem profile` or fitted coefficients")
    latency.add_argument("--emit", choices=("text", "json"), default="text", help="stdout format")
    latency.set_defaults(run=run_latency)


def run_latency(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from planner.latency.gpus import gpu_spec, node_hardware
    from planner.latency.models import resolve_model
    from planner.latency.roofline import LatencyTable, Profile
    from proto.cluster import NodeSpec

    model = resolve_model(args.model, args.dtype)
    gpu = gpu_spec(args.gpu, "--gpu")
    _check_parallelism(model, args.tp, args.pp)
    if args.decode_batch is not None:
        if args.context is None:
            raise ValueError("--context (context tokens of each sequence) is required with --decode-batch")
        _positive("--decode-batch", args.decode_batch)
        _positive("--context", args.context)
    else:
        if args.context is not None:
            raise ValueError("--context applies to --decode-batch only, not to --prefill-tokens")
        _positive("--prefill-tokens", args.prefill_tokens)

    profile = Profile.load(args.profile) if args.profile else None
    table = LatencyTable(model, profile)
    coeffs = table.coefficients(node_hardware(NodeSpec("latency", gpu.name, args.tp * args.pp)), args.tp, args.pp)
    result = {"model": model.name, "gpu": gpu.name, "tp": args.tp, "pp": args.pp, "dtype": model.dtype}
    if args.decode_batch is None:
        result.update(prefill_tokens=args.prefill_tokens, prefill_ms=coeffs.prefill_ms(args.prefill_tokens))
    else:
        result.update(
            decode_batch=args.decode_batch,
            context=args.context,
            decode_ms=coeffs.decode_ms(args.decode_batch, args.decode_batch * args.context),
        )
    c = asdict(coeffs)
    result.update(
        source=coeffs.source,
        coefficients={"prefill_ms": {k: c[k] for k in "abc"}, "decode_ms": {k: c[k] for k in "ABC"}},
    )
    if args.emit == "json":
        print(json.dumps(result, indent=2))
        return 0
    where = f"{model.name} on {gpu.name} tp={args.tp} pp={args.pp} ({model.dtype})"
    if args.decode_batch is None:
        step = f"a prefill of {args.prefill_tokens} tokens takes {result['prefill_ms']:.2f} ms"
    else:
        step = (
            f"a decode step of {args.decode_batch} sequences of {args.context} context tokens takes "
            f"{result['decode_ms']:.2f} ms"
        )
    source = coeffs.source
    if profile is not None and source == "roofline":
        source += f": {args.profile} has no entry for {gpu.name} tp={args.tp} pp={args.pp}"
    print(f"{where}: {step} ({source})")
    print(
        f"prefill ms = {coeffs.a:.4g} + {coeffs.b:.4g} T + {coeffs.c:.4g} T^2; "
        f"decode ms = {coeffs.A:.4g} + {coeffs.B:.4g} K + {coeffs.C:.4g} batch"
    )
    return 0


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


def _check_parallelism(model, tp: int, pp: int) -> None:
    """The rule planner/solve/capacity.py plans by: tp splits the query heads and splits (or
    replicates) the KV heads evenly; a stage holds at least one layer."""
    _positive("--tp", tp)
    _positive("--pp", pp)
    allowed = [
        t
        for t in range(1, model.num_heads + 1)
        if model.num_heads % t == 0 and (model.num_kv_heads % t == 0 or t % model.num_kv_heads == 0)
    ]
    if tp not in allowed:
        raise ValueError(
            f"--tp {tp} does not split {model.name}'s {model.num_heads} attention heads "
            f"({model.num_kv_heads} KV heads) evenly; allowed: {', '.join(map(str, allowed))}"
        )
    if pp > model.num_layers:
        raise ValueError(
            f"--pp {pp} exceeds {model.name}'s {model.num_layers} layers; allowed: 1 to {model.num_layers}"
        )

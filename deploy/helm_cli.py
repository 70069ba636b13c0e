"""`tandem deploy helm-values`: the Helm values that deploy a plan on Kubernetes.

tandem deploy helm-values --plan plan.yaml --model-pvc models > values.yaml
helm install tandem deploy/helm/tandem -f values.yaml
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    deploy = subparsers.add_parser("deploy", help="files that deploy a plan (Kubernetes Helm values)")
    targets = deploy.add_subparsers(dest="target", metavar="TARGET")
    deploy.set_defaults(run=lambda args: deploy.print_help() or 2)

    values = targets.add_parser(
        "helm-values",
        help="Helm values for deploy/helm/tandem that deploy exactly a plan's instances",
        description="Write values for the Tandem Helm chart: the plan (which the router serves with "
        "`tandem serve --plan`), one Ray worker pod per plan node sized to the GPUs the plan "
        "uses there, grouped by GPU type, and where the model comes from. Nothing is downloaded: "
        "the model comes from a PersistentVolumeClaim, a host path or an init container.",
    )
    values.add_argument("--plan", required=True, help="plan file from `tandem plan`")
    values.add_argument("--out", default="-", help="values file to write (default: stdout)")
    values.add_argument("--image", help="REPOSITORY:TAG of the Tandem GPU image (default tandem:<version>)")
    source = values.add_mutually_exclusive_group()
    source.add_argument(
        "--model-pvc", metavar="CLAIM", help="PersistentVolumeClaim holding the checkpoint (the default: tandem-models)"
    )
    source.add_argument("--model-host-path", metavar="DIR", help="directory on every node holding the checkpoint")
    source.add_argument(
        "--model-copy-image",
        metavar="IMAGE",
        help="image of an init container that copies the checkpoint into each pod",
    )
    values.add_argument(
        "--model-copy-command",
        metavar="SHELL",
        help="with --model-copy-image: shell command that fills $MODEL_DIR, e.g. "
        "'aws s3 sync s3://bucket/llama-3-8b \"$MODEL_DIR\"'",
    )
    values.add_argument(
        "--model-dir",
        metavar="NAME",
        help="checkpoint directory inside the volume (default: the last part of the plan's "
        "model.path, else the model's name)",
    )
    values.add_argument(
        "--gpu-node-label",
        default="tandem/gpu-type",
        metavar="KEY",
        help="node label whose value is the plan's GPU type (default tandem/gpu-type)",
    )
    values.add_argument("--cpus-per-gpu", type=int, default=4, help="CPUs per GPU in a worker pod (default 4)")
    values.add_argument(
        "--memory-per-gpu-gib", type=int, default=32, help="memory per GPU in a worker pod, GiB (default 32)"
    )
    values.set_defaults(run=run_helm_values)


def run_helm_values(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy.helm_values import ModelSource, PodSizing, default_model_dir, describe, dump_values, helm_values
    from proto.plan import Plan

    plan = Plan.load(args.plan)
    plan.check_servable()  # the chart's router runs `tandem serve --plan`
    model_dir = args.model_dir or default_model_dir(plan)
    if args.model_copy_command and not args.model_copy_image:
        raise ValueError("--model-copy-command needs --model-copy-image")
    if args.model_host_path:
        model = ModelSource("hostPath", model_dir, host_path=args.model_host_path)
    elif args.model_copy_image:
        command = ("/bin/sh", "-c", args.model_copy_command) if args.model_copy_command else ()
        model = ModelSource("copy", model_dir, copy_image=args.model_copy_image, copy_command=command)
    else:
        model = ModelSource("pvc", model_dir, claim_name=args.model_pvc or "tandem-models")
    values = helm_values(
        plan,
        model,
        image=args.image,
        gpu_node_label=args.gpu_node_label,
        sizing=PodSizing(args.cpus_per_gpu, args.memory_per_gpu_gib),
    )
    text = dump_values(values, f"{describe(plan)}\nPlan file: {args.plan}")
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(
            f"wrote {args.out}: {len(values['workerGroups'])} worker group(s); "
            f"helm install tandem deploy/helm/tandem -f {args.out}",
            file=sys.stderr,
        )
    return 0

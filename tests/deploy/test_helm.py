"""The Helm chart: lint, render and validate it offline, and check that it deploys the plan.

helm comes from scripts/install_helm.sh (pinned, sha256-checked); manifests are validated with
kubernetes-validate --strict. There is no Kubernetes cluster: these tests read what would be
applied.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections import Counter
from pathlib import Path

import click
import pytest
import yaml

from deploy import cli
from deploy.helm_values import ModelSource, PodSizing, dump_values, gpus_per_node, helm_values, worker_groups
from proto.plan import LayerStage, Plan, ray_resource_name
from tests.deploy.helm_support import (
    CHART,
    ROOT,
    heterogeneous_plan,
    install_helm,
    lint,
    parse_ray_command,
    ray_pod_templates,
    render,
    uniform_plan,
    validate,
)
from tests.deploy.helm_support import helm as run_helm

EMBEDDED_MODEL = "/opt/tandem/models/tandem-tiny-stories-v1"


@pytest.fixture(scope="session")
def helm_bin() -> str:
    return install_helm()


@pytest.fixture
def tandem_parser():
    """The real `tandem` argument parser."""
    return cli.build_parser()


def write_values(tmp_path: Path, values: dict, name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(dump_values(values, "test values"))
    return path


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def router_pod(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]


def serve_args(docs: list[dict], parser):
    """The router's `tandem serve` arguments, parsed by the real CLI (and its ray commands by Ray's)."""
    (container,) = router_pod(docs)["spec"]["containers"]
    assert container["command"][:4] == ["tini", "--", "/bin/sh", "-c"] and container["command"][5] == "tandem-router"
    script = container["command"][4].replace("\\\n", " ").splitlines()
    assert script[-1].strip() == 'exec tandem serve "$@"'
    ray_commands = [
        shlex.split(line.split(";")[0].split(">")[0].replace("until ", ""))
        for line in script
        if "ray " in line and "echo" not in line
    ]
    assert [words[:2] for words in ray_commands] == [["ray", "health-check"], ["ray", "start"]]
    assert parse_ray_command(ray_commands[0])["address"] == "$RAY_ADDRESS"
    start = parse_ray_command(ray_commands[1])
    assert (start["num_cpus"], start["num_gpus"], start["address"]) == (0, 0, "$RAY_ADDRESS")
    return parser.parse_args(["serve", *container["args"]])


def all_pods(docs: list[dict]) -> dict[str, dict]:
    return {"router": router_pod(docs), **ray_pod_templates(docs)}


def test_default_values_deploy_a_cpu_demo(helm_bin, tmp_path, tandem_parser):
    lint(helm_bin)
    docs = render(helm_bin)
    validate(docs, tmp_path)
    assert Counter(d["kind"] for d in docs) == {"Service": 2, "Deployment": 1, "RayCluster": 1, "Secret": 1}
    args = serve_args(docs, tandem_parser)
    assert args.plan is None and (args.num_prefill, args.num_decode) == (1, 1)
    assert args.host == "0.0.0.0" and args.public_metrics and not args.api_key and not args.ssl_certfile
    assert args.model == EMBEDDED_MODEL and (args.http_port, args.grpc_port) == (8000, 8001)
    (group,) = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert group["replicas"] == 1 and group["rayStartParams"] == {}
    (container,) = group["template"]["spec"]["containers"]
    assert not any("gpu" in key for key in container["resources"]["limits"])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_keys_tls_and_the_kv_secret_come_from_secrets(helm_bin, tmp_path, tandem_parser):
    values = write_values(
        tmp_path,
        {
            "security": {
                "apiKeys": {"secretName": "router-keys", "secretKey": "keys"},
                "publicMetrics": False,
                "tls": {"secretName": "router-tls", "clientCASecretName": "client-ca"},
                "kvSecretName": "my-kv",
            },
            "metrics": {"serviceMonitor": {"enabled": True}},
        },
    )
    lint(helm_bin, values)
    docs = render(helm_bin, values)
    validate(docs, tmp_path)
    assert "Secret" not in Counter(d["kind"] for d in docs)  # the named KV secret is used, none made
    args = serve_args(docs, tandem_parser)
    assert (args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs) == (
        "/etc/tandem-tls/tls.crt",
        "/etc/tandem-tls/tls.key",
        "/etc/tandem-client-ca/ca.crt",
    )
    assert not args.public_metrics
    pod = router_pod(docs)["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert env["TANDEM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "router-keys", "key": "keys"}
    assert env["TANDEM_KV_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "my-kv", "key": "kv-secret"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["tls"] == "/etc/tandem-tls" and mounts["client-ca"] == "/etc/tandem-client-ca"
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"tls": "router-tls", "client-ca": "client-ca"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet has no client certificate
        assert container[probe]["tcpSocket"] == {"port": "http"}
    endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["authorization"]["credentials"] == {"name": "router-keys", "key": "keys"}


def test_tls_without_client_certificates_keeps_http_probes(helm_bin, tmp_path):
    values = write_values(tmp_path, {"security": {"tls": {"secretName": "router-tls"}}})
    docs = render(helm_bin, values)
    (container,) = router_pod(docs)["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    kv = one(docs, "Secret")
    assert len(kv["data"]["kv-secret"]) > 64  # a random secret the chart made, base64
    assert env_of(container)["TANDEM_KV_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == kv["metadata"]["name"]


def test_plan_values_deploy_exactly_the_plan(helm_bin, tmp_path, tandem_parser):
    plan = heterogeneous_plan()
    model = ModelSource("pvc", "llama-2-7b", claim_name="models")
    values = helm_values(plan, model, image="registry.example/tandem:0.1.0")
    path = write_values(tmp_path, values)
    lint(helm_bin, path)
    docs = render(helm_bin, path, sets=("metrics.serviceMonitor.enabled=true",))
    validate(docs, tmp_path)

    # The router serves the plan, byte for byte, from the ConfigMap it mounts.
    config = one(docs, "ConfigMap")
    assert config["data"]["plan.yaml"] == values["plan"]
    assert Plan.from_dict(yaml.safe_load(config["data"]["plan.yaml"])) == plan
    args = serve_args(docs, tandem_parser)
    assert args.plan == "/etc/tandem/plan.yaml" and args.model == "/models/llama-2-7b"
    assert (args.dtype, args.block_size, args.http_port, args.grpc_port) == ("float16", 16, 8000, 8001)
    pod = router_pod(docs)["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "plan"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "plan"]
    assert mount["mountPath"] == "/etc/tandem" and volume["configMap"]["name"] == config["metadata"]["name"]

    # One Ray worker pod per plan node, with the GPUs the plan uses there, grouped by GPU type.
    groups = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    pods_by_type: Counter[tuple[str, int]] = Counter()
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        num_gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == num_gpus
        gpu = group["template"]["metadata"]["annotations"]["tandem/gpu-type"]
        assert group["rayStartParams"]["num-gpus"] == str(num_gpus)
        assert json.loads(group["rayStartParams"]["resources"].strip("'")) == {ray_resource_name(gpu): num_gpus}
        assert group["template"]["spec"]["nodeSelector"] == {"tandem/gpu-type": gpu}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"][
            "tolerations"
        ]
        pods_by_type[gpu, num_gpus] += group["replicas"]
    node_type = {n.name: n.gpu_type for n in plan.nodes}
    assert pods_by_type == Counter((node_type[name], num) for name, num in gpus_per_node(plan).items())
    assert pods_by_type == {("A100-80GB", 8): 1, ("A100-80GB", 2): 1, ("L4", 4): 2, ("L4", 2): 1}
    gpus = Counter()
    for (gpu, num), count in pods_by_type.items():
        gpus[gpu] += num * count
    assert gpus == plan.gpus_by_type()
    for group in plan.groups:  # every instance (tp x pp GPUs) fits in a pod of its type
        assert any(gpu == group.gpu_type and num >= group.tp * group.pp for gpu, num in pods_by_type)

    # Head and router do no GPU work; every pod mounts the model read-only at the same path.
    assert one(docs, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for name, template in all_pods(docs).items():
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "model"]
        assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}, name
        for container in template["spec"]["containers"]:
            assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"], name
            assert container["image"] == "registry.example/tandem:0.1.0"
    check_probes_and_services(docs)
    check_pod_security(docs)


def check_probes_and_services(docs: list[dict]) -> None:
    (container,) = router_pod(docs)["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    assert container["readinessProbe"]["grpc"] == {"port": 8001}  # grpc.health.v1, service ""
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_ADDRESS"]["value"] == "tandem-ray-head:6379" and env["HF_HUB_OFFLINE"]["value"] == "1"

    services = {s["metadata"]["name"]: s["spec"] for s in docs if s["kind"] == "Service"}
    router_labels = router_pod(docs)["metadata"]["labels"]
    assert services["tandem"]["selector"].items() <= router_labels.items()
    assert {(p["name"], p["port"], p["targetPort"]) for p in services["tandem"]["ports"]} == {
        ("http", 8000, "http"),
        ("grpc", 8001, "grpc"),
    }
    head = services["tandem-ray-head"]
    cluster = one(docs, "RayCluster")["metadata"]["name"]
    assert head["selector"] == {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    assert {p["port"] for p in head["ports"]} == {6379, 8265}

    monitor = one(docs, "ServiceMonitor")["spec"]
    service_labels = one([s for s in docs if s["metadata"]["name"] == "tandem"], "Service")["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= service_labels.items()
    assert monitor["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]


def check_pod_security(docs: list[dict]) -> None:
    for name, template in all_pods(docs).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["requests"] and container["resources"]["limits"], (name, container["name"])
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


@pytest.mark.parametrize(
    "model, volume_key",
    [
        (ModelSource("hostPath", "llama-2-7b", host_path="/data/models"), "hostPath"),
        (
            ModelSource(
                "copy",
                "llama-2-7b",
                copy_image="amazon/aws-cli:2.17.0",
                copy_command=("/bin/sh", "-c", 'aws s3 sync s3://models/llama-2-7b "$MODEL_DIR"'),
            ),
            "emptyDir",
        ),
    ],
)
def test_model_sources(helm_bin, tmp_path, model, volume_key):
    path = write_values(tmp_path, helm_values(uniform_plan(), model))
    lint(helm_bin, path)
    docs = render(helm_bin, path)
    validate(docs, tmp_path)
    for name, template in all_pods(docs).items():
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "model"]
        assert volume_key in volume, name
        init = template["spec"].get("initContainers", [])
        if model.kind == "copy":
            (copy,) = init
            assert copy["image"] == model.copy_image and copy["command"] == list(model.copy_command)
            assert {"name": "MODEL_DIR", "value": "/models/llama-2-7b"} in copy["env"]
            assert {"name": "model", "mountPath": "/models"} in copy["volumeMounts"]  # the only writer
        else:
            assert volume["hostPath"] == {"path": "/data/models", "type": "Directory"} and not init
    check_pod_security(docs)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"workerGroups": [{"name": "cpu", "gpuType": "", "replicas": "two", "gpusPerPod": 0, "resources": {}}]},
            "workerGroups.0.replicas: Invalid type. Expected: integer, given: string",
        ),
        ({"serve": {"grpcPort": "8001"}}, "serve.grpcPort: Invalid type. Expected: integer, given: string"),
        ({"model": {"source": "s3"}}, "model.source: model.source must be one of the following"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "metrics.serviceMonitor.enabled: Invalid type"),
        ({"modle": {"dir": "llama"}}, "Additional property modle is not allowed"),
    ],
)
def test_schema_rejects_bad_values(helm_bin, tmp_path, values, message):
    path = write_values(tmp_path, values)
    for command in (
        ["lint", "--strict", str(CHART), "-f", str(path)],
        ["template", "tandem", str(CHART), "-f", str(path)],
    ):
        result = run_helm(helm_bin, *command, check=False)
        assert result.returncode != 0 and message in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda groups: groups[-1].update(replicas=1),
            "the plan runs instances on 10 L4 GPUs, the worker groups with gpuType L4 have 6",
        ),
        (
            lambda groups: [g.update(gpusPerPod=2, replicas=5) for g in groups if g["gpuType"] == "A100-80GB"],
            "an instance of the plan on A100-80GB needs 4 GPUs in one pod, the largest A100-80GB pods have 2",
        ),
    ],
)
def test_render_fails_when_the_worker_groups_cannot_hold_the_plan(helm_bin, tmp_path, change, message):
    values = helm_values(heterogeneous_plan(), ModelSource("pvc", "llama-2-7b", claim_name="models"))
    change(values["workerGroups"])
    result = run_helm(
        helm_bin, "template", "tandem", str(CHART), "-f", str(write_values(tmp_path, values)), check=False
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_planner_output_deploys(helm_bin, tmp_path, tandem_parser, capsys):
    """tandem plan on the four-GPU-type example cluster, then helm-values, as docs/deploy.md does."""
    examples = ROOT / "planner" / "examples"
    plan_path, values_path = tmp_path / "plan.yaml", tmp_path / "values.yaml"
    for command in (
        [
            "plan",
            "--cluster",
            str(examples / "cluster-helix.yaml"),
            "--model",
            "llama-2-13b",
            "--workload",
            str(examples / "workload.yaml"),
            "--slo",
            str(examples / "slo.yaml"),
            "--out",
            str(plan_path),
            "--sim-requests",
            "0",
            "--time-limit",
            "20",
        ],
        ["deploy", "helm-values", "--plan", str(plan_path), "--out", str(values_path)],
    ):
        args = tandem_parser.parse_args(command)
        assert args.run(args) == 0
    capsys.readouterr()
    plan = Plan.load(plan_path)
    lint(helm_bin, values_path)
    docs = render(helm_bin, values_path)
    validate(docs, tmp_path)
    gpus = Counter()
    for group in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]:
        gpu = group["template"]["metadata"]["annotations"]["tandem/gpu-type"]
        gpus[gpu] += group["replicas"] * int(group["rayStartParams"]["num-gpus"])
    assert gpus == plan.gpus_by_type() and len(gpus) >= 2


def test_worker_groups_one_per_gpu_type_when_nodes_are_used_alike():
    groups = worker_groups(
        uniform_plan(),
        gpu_node_label="cloud.google.com/gke-accelerator",
        sizing=PodSizing(cpus_per_gpu=8, memory_per_gpu_gib=100),
    )
    assert [(g["name"], g["gpuType"], g["replicas"], g["gpusPerPod"]) for g in groups] == [
        ("h100", "H100", 2, 8),
        ("l40s", "L40S", 1, 4),
    ]
    assert groups[0]["resources"]["limits"] == {"cpu": "64", "memory": "800Gi"}
    assert groups[1]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "L40S"}


def test_cli_writes_the_values(tmp_path, tandem_parser, capsys):
    plan = uniform_plan()
    plan.save(tmp_path / "plan.yaml")
    out = tmp_path / "values.yaml"
    args = tandem_parser.parse_args(
        [
            "deploy",
            "helm-values",
            "--plan",
            str(tmp_path / "plan.yaml"),
            "--out",
            str(out),
            "--model-host-path",
            "/data/models",
            "--model-dir",
            "llama2",
        ]
    )
    assert args.run(args) == 0
    expected = helm_values(plan, ModelSource("hostPath", "llama2", host_path="/data/models"))
    assert yaml.safe_load(out.read_text()) == expected
    args = tandem_parser.parse_args(["deploy", "helm-values", "--plan", str(tmp_path / "plan.yaml")])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Helm values")
    assert yaml.safe_load(printed)["model"]["pvc"] == {"claimName": "tandem-models"}


def test_helm_values_errors_name_the_field():
    plan = uniform_plan()
    # A layer split's pods are its stages' nodes (served as chains; see test_plan_to_serve).
    stages = (
        LayerStage("prefill", "h100-0", "H100", 8, 0, 32, 1.0),
        LayerStage("decode", "l40s", "L40S", 4, 0, 32, 1.0),
    )
    split = Plan(**{**plan.__dict__, "groups": (), "routes": (), "stages": stages})
    assert [(g["gpuType"], g["replicas"], g["gpusPerPod"]) for g in worker_groups(split)] == [
        ("H100", 1, 8),
        ("L40S", 1, 4),
    ]
    with pytest.raises(ValueError, match="--model-pvc is required"):
        ModelSource("pvc", "llama")
    with pytest.raises(ValueError, match="--model-copy-command is required"):
        ModelSource("copy", "llama", copy_image="busybox")
    with pytest.raises(ValueError, match="--model-dir must be a directory name"):
        ModelSource("pvc", "a/b", claim_name="models")
    with pytest.raises(ValueError, match="--image must be REPOSITORY:TAG"):
        helm_values(plan, ModelSource("pvc", "llama", claim_name="m"), image="tandem")


def test_images_copy_real_files_and_run_the_cli():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["tandem"] == "deploy.cli:main" and callable(cli.main)
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / name).read_text().replace("\\\n", " ")
        copied = []
        for line in text.splitlines():
            if line.startswith("COPY "):
                *sources, _ = shlex.split(line)[1:]
                copied += sources
        for source in copied:
            assert (ROOT / source).exists(), f"{name} copies {source}, which does not exist"
            assert not any(
                Path(source).match(pattern) or source.startswith(pattern.rstrip("/") + "/") for pattern in ignored
            ), f"{name} copies {source}, which .dockerignore leaves out"
        assert packages <= set(copied), f"{name} does not copy {packages - set(copied)}"
        assert 'ENTRYPOINT ["tini", "--", "tandem"]' in text and 'CMD ["serve"]' in text
        assert f"tandem make-model --out {EMBEDDED_MODEL}" in text  # the chart's embedded model
        assert re.search(r"apt-get install .*\bbash\b.*\bwget\b.*\btini\b", text)  # KubeRay, the router's PID 1
        assert "USER 10001" in text and "uid 10001" in text
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"]
    assert values["image"]["tag"] == f"{chart['appVersion']}-cpu"
    ray_pin = re.search(r"^ray==(.+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert values["ray"]["version"] == ray_pin
    assert EMBEDDED_MODEL in (CHART / "templates" / "_helpers.tpl").read_text()


def test_deploy_guide_matches_the_chart_and_the_cli(helm_bin, tandem_parser):
    short = {"Deployment": "deploy", "Service": "svc"}
    objects = {(short.get(d["kind"]), d["metadata"]["name"]) for d in render(helm_bin)}
    guide = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", guide, re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    checked = Counter()
    for line in lines:
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "ray":
            try:
                params = parse_ray_command(words)
            except click.UsageError as exc:
                pytest.fail(f"docs/deploy.md: `{line}` is not a valid ray command: {exc}")
            checked["ray"] += 1
            words = list(params.get("entrypoint") or ()) or words  # ray job submit -- tandem serve ...
        if words[0] == "tandem":
            try:
                tandem_parser.parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"docs/deploy.md: `{line}` is not a valid tandem command")
            checked[words[1]] += 1
        elif words[0] == "helm" and "deploy/helm/tandem" in words:
            for item in [words[i + 1] for i, w in enumerate(words) if w == "--set"]:
                key = item.split("=", 1)[0]
                node = values
                for part in re.split(r"\.(?![^\[]*\])", key):
                    part, _, index = part.partition("[")
                    assert isinstance(node, dict) and part in node, f"docs/deploy.md sets {key}, not in values.yaml"
                    node = node[part][int(index.rstrip("]"))] if index else node[part]
            checked["helm"] += 1
        if words[0] == "kubectl":  # names the objects of release "tandem"
            for kind, name in (w.split("/", 1) for w in words if re.match(r"(deploy|svc)/", w)):
                assert (kind, name) in objects, f"docs/deploy.md: `{line}`: the chart makes no {kind}/{name}"
            checked["kubectl"] += 1
            continue
        for word in words:
            if word.startswith(("scripts/", "deploy/", "docs/")):
                assert (ROOT / word).exists(), f"docs/deploy.md: `{line}` names {word}, which does not exist"
    assert (
        checked["serve"] >= 3
        and checked["deploy"] >= 3
        and checked["plan"] >= 1
        and checked["ray"] >= 5
        and checked["helm"] >= 4
        and checked["kubectl"] >= 3
    ), checked

"""`ray job submit -- tandem serve` against a real `ray start --head`, answered over HTTP."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint, make_tokenizer
from tests.ports import free_port

RAY = Path(sys.executable).with_name("ray")
pytestmark = pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed")


def ray_cli(*args, env, timeout=120, check=True):
    return subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=timeout, check=check)


def wait_http(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def test_ray_job_submit_serves_requests(tmp_path):
    model = make_checkpoint(tmp_path / "model", "llama", make_tokenizer(tmp_path / "tok"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port, http_port, grpc_port = free_port(), free_port(), free_port(), free_port()
    # Ray puts Unix sockets under its temp dir: keep the path short (AF_UNIX limit ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="tray-", dir="/tmp"))
    ray_cli(
        "start",
        "--head",
        f"--port={gcs_port}",
        "--num-cpus=4",
        "--include-dashboard=true",
        f"--dashboard-port={dash_port}",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        env=env,
    )
    address = f"http://127.0.0.1:{dash_port}"
    try:
        assert wait_http(f"{address}/api/version", 60), "Ray dashboard (job server) did not come up"
        submitted = ray_cli(
            "job",
            "submit",
            "--address",
            address,
            "--no-wait",
            "--submission-id",
            "tandem-e2e",
            "--",
            sys.executable,
            "-m",
            "deploy.cli",
            "serve",
            "--model",
            str(model),
            "--kv-backend",
            "shm",
            "--host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--local-prefill-tokens",
            "0",
            env=env,
        )
        assert "tandem-e2e" in submitted.stdout + submitted.stderr
        if not wait_http(f"http://127.0.0.1:{http_port}/health", 180):
            logs = ray_cli("job", "logs", "--address", address, "tandem-e2e", env=env, check=False)
            pytest.fail(f"tandem serve did not become healthy; job logs:\n{logs.stdout[-3000:]}")
        body = {"model": "model", "prompt": [5, 6, 7, 8, 9, 10], "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["finish_reason"]
        ray_cli("job", "stop", "--address", address, "tandem-e2e", env=env, check=False)
        status = ""
        for _ in range(30):
            out = ray_cli("job", "status", "--address", address, "tandem-e2e", env=env, check=False)
            status = (out.stdout + out.stderr).lower()
            if "stopped" in status or "succeeded" in status:
                break
            time.sleep(1)
        assert "stopped" in status or "succeeded" in status, status
    finally:
        ray_cli("stop", "--force", env=env, check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)

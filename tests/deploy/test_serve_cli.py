"""`tandem serve` as a user starts it: what it listens on, its warnings, its defaults."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from deploy import cli
from deploy.commands import _default_kv_backend, security_from
from kv_transfer import load_backend
from tests.checkpoints import make_checkpoint, make_tokenizer

pytest.importorskip("ray", reason="ray is not installed")


def listening_addresses(root: psutil.Process) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the process tree listens on."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_serve_on_loopback_keeps_everything_it_starts_on_loopback(tmp_path):
    """Not only the two APIs: the local Ray cluster (GCS, raylets, agents, metrics) and the KV
    listeners too. Ray's children are found through the process tree of `tandem serve`."""
    model = make_checkpoint(tmp_path / "model", "llama", make_tokenizer(tmp_path / "tok"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": "/tmp"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "serve",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--shutdown-grace-s",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if "KServe gRPC" in line:
                break
        assert any("Tandem is serving" in line for line in output), "".join(output)
        time.sleep(1.0)  # let Ray's agents finish binding
        listening = listening_addresses(psutil.Process(proc.pid))
        ray_ones = {(ip, port, name) for ip, port, name in listening if "ray" in name or "gcs" in name}
        assert ray_ones, f"no Ray process found listening: {listening}"
        exposed = {entry for entry in listening if entry[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")}
        assert not exposed, f"listening beyond loopback: {sorted(exposed)}"
        assert not any("without an API key" in line for line in output)
    finally:
        proc.send_signal(signal.SIGTERM)  # as Kubernetes or systemd stop it: the main process only
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            rest = ""
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything of Ray's left behind
    assert "stopped" in rest, "".join(output) + rest


def serve_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


def test_defaults_are_safe():
    args = serve_args()
    assert args.host == "127.0.0.1" and args.api_key == [] and not args.public_metrics
    assert args.shutdown_grace_s == 10.0


def test_an_open_api_facing_the_network_is_warned_about(monkeypatch):
    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    said = []
    security_from(serve_args("--host", "0.0.0.0"), log=said.append)
    assert len(said) == 1 and "without an API key" in said[0]
    said.clear()
    security_from(serve_args("--host", "0.0.0.0", "--api-key", "k"), log=said.append)
    security_from(serve_args("--host", "127.0.0.1"), log=said.append)
    assert said == []


def test_bad_tls_settings_are_refused_before_anything_starts(tmp_path):
    assert cli.main(["serve", "--ssl-certfile", str(tmp_path / "nope.pem"), "--ssl-keyfile", "k.pem"]) == 2


def test_nixl_is_the_default_where_it_can_run():
    runnable = load_backend("nixl").unavailable_reason("cpu") is None
    assert _default_kv_backend() == ("nixl" if runnable else "shm")
    # The test environment installs the CUDA-specific wheel alone (no module named `nixl`).
    assert runnable, load_backend("nixl").unavailable_reason("cpu")


def test_autoscale_settings_are_refused_by_name_before_anything_starts(tmp_path, capsys):
    """--autoscale needs a profile with one tp 1 pp 1 entry; it does not go with --colocated."""
    assert cli.main(["serve", "--autoscale"]) == 2
    assert "--autoscale-profile" in capsys.readouterr().err
    two = tmp_path / "two.yaml"
    entry = "  tp: {tp}\n  pp: 1\n  prefill_ms: {{a: 1, b: 1, c: 0}}\n  decode_ms: {{A: 1, B: 0, C: 1}}\n"
    two.write_text(
        "model: m\nentries:\n- gpu_type: cpu\n" + entry.format(tp=1) + "- gpu_type: L4\n" + entry.format(tp=1)
    )
    assert cli.main(["serve", "--autoscale", "--autoscale-profile", str(two)]) == 2
    assert "exactly one entry with tp 1 and pp 1, it has: cpu tp 1 pp 1, L4 tp 1 pp 1" in capsys.readouterr().err
    one = tmp_path / "one.yaml"
    one.write_text("model: m\nentries:\n- gpu_type: cpu\n" + entry.format(tp=1))
    assert cli.main(["serve", "--autoscale", "--autoscale-profile", str(one), "--slo-tpot-s", "0"]) == 2
    assert "slo.tpot_s" in capsys.readouterr().err
    assert cli.main(["serve", "--autoscale", "--autoscale-profile", str(one), "--colocated"]) == 2
    assert "does not apply to --colocated" in capsys.readouterr().err

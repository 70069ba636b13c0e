"""API keys and TLS (with client certificates) on both APIs, through the real clients."""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import queue
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from router.security import Security, is_loopback
from router.server import serve
from tests.router.test_grpc_frontend import MODEL, inputs

KEY = "sk-test-0123456789"
OTHER_KEY = "sk-second-key"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, key, cert) -> tuple[str, str]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def _issue(ca_key, ca_cert, common_name: str, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """A CA made for this test, a server certificate for 127.0.0.1 and a client certificate."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("tandem test CA"))
        .issuer_name(_name("tandem test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _, ca_path = _write(root / "ca", ca_key, ca_cert)
    server_key, server_cert = _write(root / "server", *_issue(ca_key, ca_cert, "127.0.0.1", server=True))
    client_key, client_cert = _write(root / "client", *_issue(ca_key, ca_cert, "client", server=False))
    return {
        "ca": ca_path,
        "server_key": server_key,
        "server_cert": server_cert,
        "client_key": client_key,
        "client_cert": client_cert,
    }


@pytest.fixture
def start(served):
    """serve() the shared backend with the given Security; stopped after the test."""
    handles = []

    def start_with(security: Security):
        handle = served.run(serve(served.backend, 0, 0, "127.0.0.1", security=security))
        handles.append(handle)
        return handle

    yield start_with
    for handle in handles:
        served.run(handle.stop(0.5))


def http_status(url: str, headers: dict | None = None, context=None) -> int:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=30, context=context
        ) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_http_needs_a_key_except_for_health(start):
    handle = start(Security(api_keys=(KEY, OTHER_KEY)))
    base = f"http://127.0.0.1:{handle.http_port}"
    for bad in ("wrong", KEY + "x", KEY[:-1]):
        with openai.OpenAI(base_url=base + "/v1", api_key=bad, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as info:
                client.completions.create(model=MODEL, prompt="Once", max_tokens=2)
        assert info.value.status_code == 401 and "API key" in info.value.message
    for key in (KEY, OTHER_KEY):
        with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client:
            assert client.completions.create(model=MODEL, prompt="Once", max_tokens=2).choices[0].text is not None
    assert http_status(base + "/health") == 200
    assert http_status(base + "/metrics") == 401
    assert http_status(base + "/metrics", {"Authorization": f"Bearer {KEY}"}) == 200
    assert http_status(base + "/v1/models") == 401


def test_metrics_may_be_public(start):
    handle = start(Security(api_keys=(KEY,), public_metrics=True))
    assert http_status(f"http://127.0.0.1:{handle.http_port}/metrics") == 200


def admin(url: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_admin_endpoints_need_keys_to_be_set_and_name_bad_fields(start):
    """On an open server nobody may drain workers; with keys, only a caller holding one, and a
    bad target is a 400 naming the field (a colocated server has no workers to drain)."""
    open_server = start(Security())
    status, body = admin(f"http://127.0.0.1:{open_server.http_port}/admin/drain", {"role": "decode", "index": 0})
    assert status == 403 and "--api-key" in body["error"]["message"]
    url = f"http://127.0.0.1:{start(Security(api_keys=(KEY,))).http_port}/admin"
    assert admin(f"{url}/drain", {"role": "decode", "index": 0})[0] == 401
    for body, param, message in [
        ({"role": "colocated", "index": 0}, "role", "role must be 'prefill' or 'decode', got 'colocated'"),
        ({"role": "decode", "index": -1}, "index", "index must be a worker's index"),
        ({"role": "decode", "index": "0"}, "index", "index must be a worker's index"),
        ({"role": "decode", "index": 0, "timeout_s": 0}, "timeout_s", "timeout_s must be a positive number"),
        ({"role": "decode", "index": 0}, "index", "a colocated server has one engine and no workers to drain"),
    ]:
        status, error = admin(f"{url}/drain", body, KEY)
        assert status == 400 and error["error"]["param"] == param and message in error["error"]["message"], error
    status, error = admin(f"{url}/undrain", {"role": "prefill", "index": 0}, KEY)
    assert status == 400 and "no workers to drain" in error["error"]["message"]


def test_admin_steps_hands_out_each_step_once_to_a_key_holder(start, tmp_path, capsys):
    """POST /admin/steps: the engine's steps since the last call, as rows of StepRecord's
    fields; `tandem profile --from-steps` refits a profile to them."""
    from deploy.cli import main as tandem
    from planner.latency.roofline import Coefficients, Profile, ProfileEntry

    open_server = start(Security())
    status, body = admin(f"http://127.0.0.1:{open_server.http_port}/admin/steps", {})
    assert status == 403 and "--api-key" in body["error"]["message"]
    handle = start(Security(api_keys=(KEY,)))
    url = f"http://127.0.0.1:{handle.http_port}"
    assert admin(f"{url}/admin/steps", {})[0] == 401
    admin(f"{url}/admin/steps", {}, KEY)  # what earlier tests ran
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
        for n in (5, 20, 40):  # three prompt sizes, each then decoding (no prefix in common)
            client.completions.create(
                model=MODEL,
                prompt=[5 + (n + 3 * i) % 370 for i in range(n)],
                max_tokens=6,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
    status, body = admin(f"{url}/admin/steps", {}, KEY)
    assert status == 200, body
    assert body["fields"] == ["prefill_tokens", "attn_tokens2", "num_decodes", "context_tokens", "ms", "at_s"]
    ((worker),) = body["workers"]
    assert (worker["role"], worker["index"]) == ("colocated", 0)
    rows = worker["steps"]
    assert [row[:4] for row in rows if row[0]] == [[5, 25, 0, 0], [20, 400, 0, 0], [40, 1600, 0, 0]]
    assert [row[2:4] for row in rows if row[2]] == [[1, n + k] for n in (5, 20, 40) for k in range(1, 6)]
    assert all(row[4] > 0 for row in rows)
    # Each step started after the one before had taken its time (one engine, one step at a time).
    assert all(b[5] >= a[5] + a[4] / 1e3 - 1e-6 for a, b in itertools.pairwise(rows))
    assert admin(f"{url}/admin/steps", {}, KEY)[1]["workers"][0]["steps"] == []  # taken once

    steps, base, served = tmp_path / "steps.json", tmp_path / "base.yaml", tmp_path / "served.yaml"
    steps.write_text(json.dumps(body))
    coeffs = Coefficients(a=1000, b=0, c=0, A=1000, B=0, C=0, source="profile")  # far slower than this engine
    Profile("tiny", (ProfileEntry("cpu", 1, 1, coeffs),)).save(base)
    assert tandem(["profile", "--from-steps", str(steps), "--base", str(base), "--out", str(served)]) == 0
    refit = Profile.load(served).find("cpu", 1, 1)
    assert refit is not None and refit.prefill_ms(20) < 1000 and refit.decode_ms(1, 30) < 1000
    # What a server from before steps recorded their start answered refits too.
    old = {"fields": body["fields"][:5], "workers": [{**worker, "steps": [row[:5] for row in rows]}]}
    steps.write_text(json.dumps(old))
    assert tandem(["profile", "--from-steps", str(steps), "--base", str(base), "--out", str(served)]) == 0
    steps.write_text(json.dumps({"workers": []}))
    assert tandem(["profile", "--from-steps", str(steps), "--base", str(base), "--out", str(served)]) == 2
    assert "not what POST /admin/steps answers" in capsys.readouterr().err


def test_grpc_needs_a_key_except_for_probes(start):
    handle = start(Security(api_keys=(KEY,)))
    url = f"127.0.0.1:{handle.grpc_port}"
    with triton.InferenceServerClient(url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, inputs(sampling={"max_tokens": 2}))
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, inputs(sampling={"max_tokens": 2}), headers={"authorization": "Bearer wrong"})
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        result = client.infer(MODEL, inputs(sampling={"max_tokens": 2}), headers={"authorization": f"Bearer {KEY}"})
        assert result.as_numpy("finish_reason")[0] in (b"length", b"stop")
        assert client.is_server_live() and client.is_server_ready()  # probes stay open
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata(MODEL)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    with grpc.insecure_channel(url) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def _put_pair(responses: queue.Queue, result, error) -> None:
    """A stream callback: each (result, error) the client hands it goes on `responses`."""
    responses.put((result, error))


def test_grpc_streams_need_a_key(start):
    handle = start(Security(api_keys=(KEY,)))
    url = f"127.0.0.1:{handle.grpc_port}"
    for headers, expect_ok in ((None, False), ({"authorization": f"Bearer {KEY}"}, True)):
        responses: queue.Queue = queue.Queue()
        with triton.InferenceServerClient(url) as client:
            client.start_stream(callback=functools.partial(_put_pair, responses), headers=headers)
            with contextlib.suppress(InferenceServerException):  # the stream may be refused already
                client.async_stream_infer(MODEL, inputs(sampling={"max_tokens": 2}, stream=False))
            result, error = responses.get(timeout=30)
            with contextlib.suppress(InferenceServerException):
                client.stop_stream()
        if expect_ok:
            assert error is None and result.as_numpy("finish_reason")[0] in (b"length", b"stop")
        else:
            assert result is None and "UNAUTHENTICATED" in str(error)


def test_tls_with_client_certificates_through_both_clients(start, pki):
    handle = start(
        Security(
            api_keys=(KEY,), ssl_certfile=pki["server_cert"], ssl_keyfile=pki["server_key"], ssl_ca_certs=pki["ca"]
        )
    )
    base = f"https://127.0.0.1:{handle.http_port}"
    # The openai SDK's own HTTP client class, given the test CA and the client certificate.
    context = ssl.create_default_context(cafile=pki["ca"])
    context.load_cert_chain(pki["client_cert"], pki["client_key"])
    with openai.DefaultHttpxClient(verify=context, timeout=30) as http:
        with openai.OpenAI(base_url=base + "/v1", api_key=KEY, http_client=http, max_retries=0) as client:
            completion = client.completions.create(model=MODEL, prompt="Once", max_tokens=2)
            assert completion.choices[0].finish_reason in ("length", "stop")
    # Without a client certificate the TLS handshake itself fails.
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        http_status(base + "/health", context=ssl.create_default_context(cafile=pki["ca"]))
    with triton.InferenceServerClient(
        f"127.0.0.1:{handle.grpc_port}",
        ssl=True,
        root_certificates=pki["ca"],
        private_key=pki["client_key"],
        certificate_chain=pki["client_cert"],
    ) as client:
        result = client.infer(MODEL, inputs(sampling={"max_tokens": 2}), headers={"authorization": f"Bearer {KEY}"})
        assert result.as_numpy("finish_reason")[0] in (b"length", b"stop")
    with triton.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}", ssl=True, root_certificates=pki["ca"]) as client:
        with pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=10)


def test_tls_without_client_certificates(start, pki):
    handle = start(Security(ssl_certfile=pki["server_cert"], ssl_keyfile=pki["server_key"]))
    context = ssl.create_default_context(cafile=pki["ca"])
    assert http_status(f"https://127.0.0.1:{handle.http_port}/health", context=context) == 200
    with triton.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}", ssl=True, root_certificates=pki["ca"]) as client:
        assert client.is_server_live()


def test_settings_that_cannot_work_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="ssl_certfile and ssl_keyfile go together"):
        Security(ssl_certfile=str(tmp_path))
    with pytest.raises(ValueError, match="ssl_ca_certs .* needs TLS"):
        Security(ssl_ca_certs=str(tmp_path))
    with pytest.raises(ValueError, match="ssl_certfile: .* is not a file"):
        Security(ssl_certfile=str(tmp_path / "missing.pem"), ssl_keyfile=str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="api keys must be non-empty"):
        Security(api_keys=(" padded",))
    monkeypatch.setenv("TANDEM_API_KEY", "k1, k2")
    assert Security.from_keys(["k0", "k1"]).api_keys == ("k0", "k1", "k2")


def test_loopback_is_recognised():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")

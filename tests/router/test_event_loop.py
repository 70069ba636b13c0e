"""Nothing one client sends stalls the event loop that every other client is served from."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.router.test_grpc_frontend import MODEL, inputs


def post(served, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(served.http_url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def health(served) -> int:
    with urllib.request.urlopen(served.http_url + "/health", timeout=30) as response:
        return response.status


@pytest.fixture
def held_tokenizer(served, monkeypatch):
    """Tokenizing long text blocks until the test lets it go: while it is blocked, the server
    must still answer. Had the text been tokenized on the event loop, nothing would."""
    tokenizer = served.backend.tokenizer
    real = tokenizer.encode
    entered, release = threading.Event(), threading.Event()

    def encode(text, *args, **kwargs):
        if len(text) > 4096:
            entered.set()
            assert release.wait(30), "the test never released the tokenizer"
        return real(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
    yield entered, release
    release.set()


def test_long_http_prompt_is_tokenized_off_the_loop(served, held_tokenizer):
    entered, release = held_tokenizer
    text = "Once upon a time there was a little duck. " * 120  # ~5k characters: a thread's job
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, served, json.dumps({"model": MODEL, "prompt": text, "max_tokens": 2}).encode())
        assert entered.wait(30)
        assert health(served) == 200  # answered while the long prompt is being tokenized
        release.set()
        status, body = pending.result(60)
    assert status in (200, 400), body  # 400: the tiny model's context may be too short for it


def test_long_grpc_prompt_is_tokenized_off_the_loop(served, held_tokenizer):
    entered, release = held_tokenizer
    text = "Once upon a time there was a little duck. " * 120
    with triton.InferenceServerClient(served.grpc_url) as client, ThreadPoolExecutor(1) as pool:

        def infer():
            try:
                return client.infer(MODEL, inputs(text, sampling={"max_tokens": 2}))
            except InferenceServerException as exc:
                return exc

        pending = pool.submit(infer)
        assert entered.wait(30)
        with grpc.insecure_channel(served.grpc_url) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        release.set()
        result = pending.result(60)
    assert not isinstance(result, InferenceServerException) or result.status() == "StatusCode.INVALID_ARGUMENT"


def test_oversize_bodies_are_refused_unread(served):
    status, body = post(served, b" " * (served.encoder.max_request_bytes + 1))
    assert status == 413 and "larger than" in body["error"]["message"]
    assert health(served) == 200


def test_oversize_grpc_messages_are_refused(served):
    text = "a" * (served.encoder.max_request_bytes + 1)
    with triton.InferenceServerClient(served.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, inputs(text))
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_text_that_cannot_fit_is_refused_without_tokenizing(served, held_tokenizer):
    entered, _release = held_tokenizer
    text = "a" * (served.encoder.max_chars + 1)
    status, body = post(served, json.dumps({"model": MODEL, "prompt": text}).encode())
    assert status == 400 and "context window" in body["error"]["message"] and not entered.is_set()
    with triton.InferenceServerClient(served.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, inputs(text))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and not entered.is_set()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"model": "tiny-llama", "prompt": "a", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_deeply_nested_json_is_a_400(served, body):
    status, error = post(served, body)
    assert status == 400 and error["error"]["type"] == "invalid_request_error", error
    assert health(served) == 200

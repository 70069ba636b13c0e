"""The OpenAI-compatible HTTP frontend, driven by the openai package itself."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import openai
import pytest

from tests.checkpoints import hf_greedy

MODEL = "tiny-llama"
PROMPT = "Once upon a time"
GREEDY = dict(temperature=0, max_tokens=10, extra_body={"ignore_eos": True})


@pytest.fixture
def client(served):
    # No retries: a 429 or 503 must reach the test, not be retried away.
    with openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def greedy_text(served, tiny_llama_dir, prompt_ids, n) -> str:
    """The transformers oracle's text (the engine never emits a trailing half character)."""
    ids = hf_greedy(tiny_llama_dir, prompt_ids, n, ignore_eos=True)
    return served.backend.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def post(served, path: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(served.http_url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_completion_matches_transformers_streamed_or_not(served, tiny_llama_dir, client):
    expected = greedy_text(served, tiny_llama_dir, served.backend.tokenizer.encode(PROMPT), 10)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert completion.choices[0].text == expected and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 10
    assert completion.usage.prompt_tokens == len(served.backend.tokenizer.encode(PROMPT))

    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected and len(text_chunks) > 2
    assert [c.choices[0].finish_reason for c in text_chunks][-2:] == [None, "length"]
    assert chunks[-1].usage.total_tokens == completion.usage.total_tokens

    by_ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], **GREEDY)
    assert by_ids.choices[0].text == greedy_text(served, tiny_llama_dir, [5, 6, 7, 8], 10)


def test_chat_uses_fallback_template_streamed_or_not(served, tiny_llama_dir, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story."}]
    rendered = "<s>system: Be brief.\nuser: Tell a story.\nassistant:"  # the documented fallback
    prompt_ids = served.backend.tokenizer.encode(rendered, add_special_tokens=False)
    expected = greedy_text(served, tiny_llama_dir, prompt_ids, 10)
    chat = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == expected
    assert chat.usage.prompt_tokens == len(prompt_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_health_and_metrics(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with urllib.request.urlopen(served.http_url + "/health") as response:
        assert response.status == 200
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    num_refreshes = served.backend.num_refreshes
    assert served.metric("tandem_time_to_first_token_seconds_count", frontend="http") >= 1
    assert served.metric("tandem_time_per_output_token_seconds_count", frontend="http") >= 1
    assert served.metric("tandem_requests_total", frontend="http", finish_reason="length") >= 1
    assert served.metric("tandem_backend_num_blocks") == served.backend.stats()["num_blocks"]
    assert served.metric("tandem_backend_kv_usage") == 0.0
    assert served.backend.num_refreshes > num_refreshes  # every scrape asked for fresh stats


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"prompt": PROMPT}, "model", "model is missing"),
        ({"model": MODEL}, "prompt", "prompt must be a string"),
        (
            {"model": MODEL, "prompt": PROMPT, "temperature": -1},
            "temperature",
            "temperature must be a finite number >= 0",
        ),
        ({"model": MODEL, "prompt": PROMPT, "temperature": "hot"}, "temperature", "must be a number"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, "max_tokens", "max_tokens must be a positive"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": 100000}, "max_tokens", "does not fit"),
        ({"model": MODEL, "prompt": "word " * 600}, "prompt", "context window"),
        ({"model": MODEL, "prompt": PROMPT, "n": 2}, "n", "n=2 is not supported"),
        ({"model": MODEL, "prompt": [5, 10**9]}, None, "outside the vocabulary"),
    ],
)
def test_bad_completion_is_400_naming_the_field(served, body, param, needle):
    status, error = post(served, "/v1/completions", body)
    assert status == 400 and error["error"]["param"] == param and needle in error["error"]["message"]
    assert error["error"]["type"] == "invalid_request_error"


def test_bad_chat_body_and_unknown_model(served, client):
    status, error = post(served, "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in error["error"]["message"]
    status, error = post(served, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot"}]})
    assert status == 400 and error["error"]["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"


def test_overload_is_429_and_failures_are_500_or_503(client, backend):
    backend.fail = "overloaded"
    with pytest.raises(openai.RateLimitError, match="max_waiting"):
        client.completions.create(model=MODEL, prompt=PROMPT)
    backend.fail = "error"
    # The error comes after the first text delta: a plain response still reports it as a status...
    with pytest.raises(openai.InternalServerError, match="sampling failed") as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, extra_body={"ignore_eos": True})
    assert info.value.status_code == 500
    # A dead worker is 503 whether the router noticed it yet or not, in the stream or before it.
    for ready in (True, False):
        backend.fail, backend.ready = "worker_died", ready
        with pytest.raises(openai.InternalServerError, match="decode worker 0 died") as info:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, extra_body={"ignore_eos": True})
        assert info.value.status_code == 503
        backend.fail = "unavailable"
        with pytest.raises(openai.InternalServerError, match="no decode worker is up") as info:
            client.completions.create(model=MODEL, prompt=PROMPT)
        assert info.value.status_code == 503
    backend.fail, backend.ready = "abort", True
    with pytest.raises(openai.InternalServerError, match="aborted by the server") as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, extra_body={"ignore_eos": True})
    assert info.value.status_code == 503
    backend.fail = "worker_died"
    # ...while a stream that has started reports it as an error event.
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=20, stream=True, extra_body={"ignore_eos": True}
    )
    with pytest.raises(openai.APIError, match="decode worker 0 died"):
        list(stream)


def test_client_disconnect_aborts_and_frees_blocks(served):
    before = served.metric("tandem_requests_total", frontend="http", finish_reason="cancelled")
    body = json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    ).encode()
    with socket.create_connection(("127.0.0.1", served.handle.http_port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"data: {" not in received:  # wait until streaming has started, then hang up
            received += sock.recv(65536)
    served.wait_all_blocks_free()
    assert served.metric("tandem_requests_total", frontend="http", finish_reason="cancelled") == before + 1

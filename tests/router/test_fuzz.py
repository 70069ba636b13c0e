"""Property-based requests over both APIs: no input gets a 5xx or hurts anyone else.

Hypothesis draws hundreds of requests per run (derandomized, so CI sees the same ones): well
formed, malformed and extreme (NaN and 1e-300 sampling values, huge integers, deep nesting,
lone surrogates, wrong types, wrong tensors). Every answer must be a success or a client
error that names the problem; after every batch the server must be healthy, hold no KV
block, and still answer a greedy request token for token as transformers does.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.kserve import grpc_service_pb2 as pb
from proto.kserve import grpc_service_pb2_grpc as pb_grpc
from router.kserve import serialize_bytes
from router.requests import SAMPLING_FIELDS
from tests.checkpoints import hf_greedy

MODEL = "tiny-llama"
CHECK_EVERY = 50  # requests between health / leak / oracle checks
FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HTTP_CLIENT_ERRORS = {400, 404, 413, 429}
GRPC_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}

surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc00" * 3])
texts = st.one_of(st.text(max_size=60), surrogates, st.just(""), st.just("Once upon a time"))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.sampled_from([1e-300, 5e-324, -0.0, 2**64, 2**64 - 1, 1e308]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
deep = st.integers(min_value=50, max_value=3000).map(lambda n: json.loads("[" * n + "]" * n) if n < 900 else n)
# Values near what each field accepts, and far from it.
field_values = {
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0, 1e-300, 5e-324, math.nan, math.inf, -1, 1e300])),
    "top_p": st.one_of(st.floats(0, 1), st.sampled_from([1e-300, 1e-45, math.nan, 0, 1.5])),
    "top_k": st.one_of(st.integers(-2, 500), st.sampled_from([2**63, -(2**63)])),
    "max_tokens": st.one_of(st.integers(1, 6), st.sampled_from([0, -1, 10**9, 2**64])),
    "seed": st.one_of(st.integers(0, 2**64 + 5), st.sampled_from([-1, 2**64, 2**100])),
    "stop": st.one_of(texts, st.lists(texts, max_size=3)),
    "stop_token_ids": st.lists(st.integers(-5, 2**40), max_size=4),
    "ignore_eos": st.booleans(),
}


@st.composite
def sampling_fields(draw) -> dict:
    fields = {}
    for name in draw(st.lists(st.sampled_from(sorted(SAMPLING_FIELDS)), max_size=5, unique=True)):
        fields[name] = draw(
            st.one_of(field_values[name], json_values) if draw(st.integers(0, 4)) == 0 else field_values[name]
        )
    if draw(st.booleans()):
        fields["max_tokens"] = draw(st.integers(1, 6))  # keep most generations short
    return fields


prompts = st.one_of(
    texts,
    st.lists(st.integers(-3, 500), max_size=40),
    st.lists(st.integers(0, 2**70), max_size=3),
    json_values,
    deep,
    st.just([]),
)


good_texts = st.one_of(
    st.just("Once upon a time"), st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40)
)
good_ids = st.lists(st.integers(0, 383), min_size=1, max_size=40)


@st.composite
def openai_bodies(draw) -> tuple[str, object]:
    chat = draw(st.booleans())
    body: dict = draw(sampling_fields())
    if draw(st.booleans()):  # near valid: the right model and a usable prompt, sampling values anywhere
        body["model"] = MODEL
        if chat:
            body["messages"] = [{"role": "user", "content": draw(good_texts)}]
            body.setdefault("max_tokens", draw(st.integers(1, 6)))
        else:
            body["prompt"] = draw(st.one_of(good_texts, good_ids))
        body["stream"] = draw(st.booleans())
        return ("chat/completions" if chat else "completions"), json.dumps(body).encode()
    body["model"] = draw(st.one_of(st.just(MODEL), st.just(MODEL), json_values))
    if chat:
        role = st.one_of(st.sampled_from(["user", "system", "assistant", "developer"]), json_values)
        content = st.one_of(
            texts, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2), json_values
        )
        body["messages"] = draw(
            st.one_of(
                st.lists(st.fixed_dictionaries({"role": role, "content": content}), min_size=1, max_size=3), json_values
            )
        )
        body.setdefault("max_tokens", draw(st.integers(1, 6)))
    else:
        body["prompt"] = draw(prompts)
    for extra in draw(
        st.lists(
            st.sampled_from(
                ["stream", "n", "logprobs", "echo", "stream_options", "user", "best_of", "response_format"]
            ),
            max_size=3,
            unique=True,
        )
    ):
        body[extra] = draw(json_values)
    raw = draw(st.sampled_from(["json", "json", "json", "garbage", "deep"]))
    if raw == "garbage":
        return ("chat/completions" if chat else "completions"), draw(st.binary(max_size=64))
    if raw == "deep":
        n = draw(st.integers(1000, 100_000))
        return "completions", ("[" * n + "]" * n).encode()
    return ("chat/completions" if chat else "completions"), json.dumps(body).encode()


def post(url: str, data: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Tally:
    """Counts requests and server errors; checks the server between batches."""

    def __init__(self, served, tiny_llama_dir):
        self.served, self.model_dir = served, tiny_llama_dir
        self.num_requests = self.num_5xx = 0
        self.statuses: dict = {}

    def record(self, status) -> None:
        self.num_requests += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if self.num_requests % CHECK_EVERY == 0:
            self.check_server()

    def check_server(self) -> None:
        """Healthy, no block held, and greedy tokens still equal transformers."""
        with urllib.request.urlopen(self.served.http_url + "/health", timeout=30) as response:
            status = response.status
        assert status == 200
        self.served.wait_all_blocks_free()
        prompt = [5, 17, 42, 99, 7]
        status, body = post(
            self.served.http_url + "/v1/completions",
            json.dumps(
                {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            ).encode(),
        )
        assert status == 200
        expected = hf_greedy(self.model_dir, prompt, 8, ignore_eos=True)
        text = self.served.backend.tokenizer.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
        assert json.loads(body)["choices"][0]["text"] == text


@pytest.fixture(scope="module")
def http_tally(served, tiny_llama_dir):
    tally = Tally(served, tiny_llama_dir)
    yield tally
    tally.check_server()
    print(f"\nHTTP fuzz: {tally.num_requests} requests, statuses {tally.statuses}")


@pytest.fixture(scope="module")
def grpc_tally(served, tiny_llama_dir):
    tally = Tally(served, tiny_llama_dir)
    yield tally
    tally.check_server()
    print(f"\ngRPC fuzz: {tally.num_requests} requests, statuses {tally.statuses}")


@FUZZ_SETTINGS
@given(request=openai_bodies())
def test_http_requests_never_get_a_5xx(served, http_tally, request):
    path, data = request
    status, body = post(f"{served.http_url}/v1/{path}", data)
    http_tally.record(status)
    assert status < 500, (status, body[:300], data[:300])
    if status != 200:
        assert status in HTTP_CLIENT_ERRORS, status
        assert json.loads(body)["error"]["message"]
    elif b"data: " in body[:6]:  # a stream: no error event after the 200
        assert b'"error"' not in body, body[-300:]


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    if draw(st.booleans()):  # near valid: the right model and tensors, sampling values anywhere
        msg = pb.ModelInferRequest(model_name=MODEL)
        msg.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        msg.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
        fields = draw(sampling_fields())
        fields.setdefault("max_tokens", draw(st.integers(1, 6)))
        msg.raw_input_contents.extend(
            [serialize_bytes(draw(good_texts).encode()), serialize_bytes(json.dumps(fields).encode())]
        )
        return msg
    msg = pb.ModelInferRequest(
        model_name=draw(st.one_of(st.just(MODEL), st.just(MODEL), st.text(max_size=8))),
        model_version=draw(st.sampled_from(["", "1", "2"])),
    )
    names = draw(
        st.lists(
            st.sampled_from(["text_input", "text_input", "sampling_parameters", "stream", "other"]),
            min_size=0,
            max_size=4,
        )
    )
    use_raw = draw(st.booleans())
    for name in names:
        datatype = draw(st.sampled_from(["BYTES", "BYTES", "BOOL", "INT32", "FP32", ""]))
        shape = draw(st.one_of(st.just([1]), st.lists(st.integers(-2, 3), max_size=3)))
        tensor = msg.inputs.add(name=name, datatype=datatype, shape=shape)
        if name == "sampling_parameters":
            payload = draw(
                st.one_of(
                    st.builds(lambda f: json.dumps(f).encode(), sampling_fields()),
                    st.binary(max_size=40),
                    deep.map(lambda v: json.dumps(v).encode()),
                )
            )
        elif name == "stream":
            payload = draw(st.sampled_from([b"\x00", b"\x01", b"\x01\x01", b""]))
        else:
            payload = draw(st.one_of(texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=40)))
        if use_raw:
            raw = payload if name == "stream" else serialize_bytes(payload)
            if draw(st.integers(0, 9)) == 0:
                raw = draw(st.binary(max_size=12))  # a broken length prefix
            msg.raw_input_contents.append(raw)
        elif name == "stream":
            tensor.contents.bool_contents.extend(bool(b) for b in payload)
        else:
            tensor.contents.bytes_contents.append(payload)
    if not any(n == "sampling_parameters" for n in names) and draw(st.booleans()):
        tensor = msg.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
        payload = json.dumps({"max_tokens": draw(st.integers(1, 6))}).encode()
        if use_raw:
            msg.raw_input_contents.append(serialize_bytes(payload))
        else:
            tensor.contents.bytes_contents.append(payload)
    for name in draw(st.lists(st.sampled_from(["text_output", "finish_reason", "other"]), max_size=2)):
        msg.outputs.add(name=name)
    return msg


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@FUZZ_SETTINGS
@given(msg=infer_requests())
def test_grpc_requests_never_get_a_server_error(stub, grpc_tally, msg):
    try:
        stub.ModelInfer(msg, timeout=120)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert code in GRPC_CLIENT_ERRORS, (code, error.details(), msg)
        assert error.details()
    grpc_tally.record(code.name)

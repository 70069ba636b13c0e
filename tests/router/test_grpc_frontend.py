"""The KServe v2 gRPC frontend, driven by tritonclient itself."""

from __future__ import annotations

import json
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.utils import InferenceServerException

from tests.checkpoints import hf_greedy

MODEL = "tiny-llama"
PROMPT = "Once upon a time"


def inputs(text=PROMPT, sampling: dict | str | None = None, stream: bool | None = None, text_datatype="BYTES") -> list:
    tensors = [triton.InferInput("text_input", [1], text_datatype)]
    tensors[0].set_data_from_numpy(
        np.array([text.encode()], dtype=object) if text_datatype == "BYTES" else np.array([1], dtype=np.int32)
    )
    if sampling is not None:
        raw = sampling if isinstance(sampling, str) else json.dumps(sampling)
        tensors.append(triton.InferInput("sampling_parameters", [1], "BYTES"))
        tensors[-1].set_data_from_numpy(np.array([raw.encode()], dtype=object))
    if stream is not None:
        tensors.append(triton.InferInput("stream", [1], "BOOL"))
        tensors[-1].set_data_from_numpy(np.array([stream], dtype=bool))
    return tensors


@pytest.fixture
def client(served):
    with triton.InferenceServerClient(served.grpc_url) as c:
        yield c


def text_of(result) -> str:
    return result.as_numpy("text_output")[0].decode()


def greedy_text(served, tiny_llama_dir, prompt, n) -> str:
    """The transformers oracle's text. A random model can end on half a UTF-8 character,
    which the engine never emits, so the oracle's trailing replacement characters go too."""
    tok = served.backend.tokenizer
    ids = hf_greedy(tiny_llama_dir, tok.encode(prompt), n, ignore_eos=True)
    return tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def stream_requests(client, requests: list[dict], num_errors=0, timeout_s=30.0) -> dict[str, list]:
    """Send requests on one stream; collect results per request id until each is final.

    tritonclient hands an error response to the callback without its request id, so errors
    are collected under "errors", and the caller says how many to wait for.
    """
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for r in requests:
            client.async_stream_infer(MODEL, r["inputs"], request_id=r["id"])
        by_id: dict[str, list] = {r["id"]: [] for r in requests}
        by_id["errors"] = []
        num_final = 0
        while num_final < len(requests) - num_errors or len(by_id["errors"]) < num_errors:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                by_id["errors"].append(error)
                continue
            response = result.get_response()
            by_id[response.id].append(result)
            num_final += response.parameters["triton_final_response"].bool_param
        return by_id
    finally:
        client.stop_stream()


def test_health_metadata_and_config(served, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("other")
    assert client.get_server_metadata().name == "tandem"
    meta = client.get_model_metadata(MODEL)
    assert meta.versions == ["1"] and [i.name for i in meta.inputs] == ["text_input", "stream", "sampling_parameters"]
    config = client.get_model_config(MODEL).config  # parsed with Triton's own model_config.proto
    assert config.name == MODEL and config.model_transaction_policy.decoupled
    assert [o.name for o in config.output] == ["text_output", "finish_reason"]
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.get_model_metadata("other")
    with pytest.raises(InferenceServerException) as info:
        client.get_model_repository_index()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"

    with grpc.insecure_channel(served.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(services)


def test_infer_matches_transformers(served, tiny_llama_dir, client):
    result = client.infer(MODEL, inputs(sampling={"temperature": 0, "max_tokens": 12, "ignore_eos": True}))
    assert text_of(result) == greedy_text(served, tiny_llama_dir, PROMPT, 12)
    assert result.as_numpy("finish_reason")[0] == b"length"
    # vLLM's Triton backend sends sampling values as strings too.
    again = client.infer(
        MODEL,
        inputs(sampling={"temperature": "0", "max_tokens": "12", "ignore_eos": "true"}),
        outputs=[triton.InferRequestedOutput("text_output")],
    )
    assert text_of(again) == text_of(result) and again.as_numpy("finish_reason") is None


def test_streams_concurrent_requests_with_final_flags(served, tiny_llama_dir, client):
    greedy = {"temperature": 0, "max_tokens": 10, "ignore_eos": True}
    prompts = {"a": PROMPT, "b": "The little dog", "c": "She said"}
    requests = [{"id": i, "inputs": inputs(p, greedy, stream=True)} for i, p in prompts.items()]
    requests.append({"id": "whole", "inputs": inputs(PROMPT, greedy, stream=False)})
    by_id = stream_requests(client, requests)
    for rid, prompt in prompts.items():
        results = by_id[rid]
        finals = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
        assert finals == [False] * (len(results) - 1) + [True] and len(results) > 2
        assert "".join(text_of(r) for r in results) == greedy_text(served, tiny_llama_dir, prompt, 10)
        assert results[-1].as_numpy("finish_reason")[0] == b"length"
    assert len(by_id["whole"]) == 1 and text_of(by_id["whole"][0]) == greedy_text(served, tiny_llama_dir, PROMPT, 10)


@pytest.mark.parametrize(
    "bad_inputs, needle",
    [
        (lambda: inputs(sampling={"temperature": 0})[1:], "'text_input' is missing"),
        (lambda: inputs(text_datatype="INT32"), "'text_input' must have datatype BYTES"),
        (lambda: inputs(sampling="{temperature: 0}"), "sampling_parameters is not valid JSON"),
        (lambda: inputs(sampling={"temperature": -1}), "sampling_parameters.temperature"),
        (lambda: inputs(sampling={"max_tokens": 0}), "sampling_parameters.max_tokens"),
        (lambda: inputs(sampling={"temprature": 0.5}), "unknown sampling field 'sampling_parameters.temprature'"),
        (lambda: inputs(text="word " * 600), "context window"),
        (lambda: inputs(stream=True), "needs ModelStreamInfer"),
    ],
)
def test_bad_input_is_invalid_argument(client, bad_inputs, needle):
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, bad_inputs())
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and needle in info.value.message()


def test_unknown_model_overload_and_failure_statuses(client, backend):
    with pytest.raises(InferenceServerException) as info:
        client.infer("other", inputs())
    assert info.value.status() == "StatusCode.NOT_FOUND"
    backend.fail = "overloaded"
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, inputs())
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "max_waiting" in info.value.message()
    backend.fail = "error"  # the request's own failure: retrying it would fail again
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, inputs(sampling={"max_tokens": 20, "ignore_eos": True}))
    assert info.value.status() == "StatusCode.INTERNAL" and "sampling failed" in info.value.message()
    # A worker that died: UNAVAILABLE whether the router has noticed yet (ready) or not, and
    # whether the request was refused before its stream or failed in it.
    for ready in (True, False):
        backend.ready = ready
        backend.fail = "worker_died"
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, inputs(sampling={"max_tokens": 20, "ignore_eos": True}))
        assert info.value.status() == "StatusCode.UNAVAILABLE" and "decode worker 0 died" in info.value.message()
        backend.fail = "unavailable"
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, inputs())
        assert info.value.status() == "StatusCode.UNAVAILABLE" and "no decode worker is up" in info.value.message()


def test_stream_error_keeps_other_requests_going(client, served):
    greedy = {"temperature": 0, "max_tokens": 6}
    by_id = stream_requests(
        client,
        [
            {"id": "bad", "inputs": inputs(sampling={"top_p": 0})},
            {"id": "good", "inputs": inputs(sampling=greedy, stream=True)},
        ],
        num_errors=1,
    )
    [error] = by_id["errors"]
    assert error.message().startswith("INVALID_ARGUMENT: sampling_parameters.top_p")
    assert by_id["good"][-1].get_response().parameters["triton_final_response"].bool_param


def test_cancelled_stream_aborts_and_frees_blocks(served, client):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    long = {"temperature": 0, "max_tokens": 400, "ignore_eos": True}
    client.async_stream_infer(MODEL, inputs(sampling=long, stream=True), request_id="long")
    result, error = responses.get(timeout=30)
    assert error is None and text_of(result) is not None
    client.stop_stream(cancel_requests=True)
    served.wait_all_blocks_free()
    assert served.metric("tandem_requests_total", frontend="grpc", finish_reason="cancelled") == 1

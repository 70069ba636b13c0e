"""serve() and stop(): free ports, draining running requests, cancelling after the grace period."""

from __future__ import annotations

import asyncio
import queue
import time

import numpy as np
import openai
import pytest
import tritonclient.grpc as triton

from router.server import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, serve

MODEL = "tiny-llama"
PROMPT = "Once upon a time"


def text_input(text: str, sampling: str) -> list:
    tensors = [
        triton.InferInput("text_input", [1], "BYTES"),
        triton.InferInput("sampling_parameters", [1], "BYTES"),
        triton.InferInput("stream", [1], "BOOL"),
    ]
    tensors[0].set_data_from_numpy(np.array([text.encode()], dtype=object))
    tensors[1].set_data_from_numpy(np.array([sampling.encode()], dtype=object))
    tensors[2].set_data_from_numpy(np.array([True]))
    return tensors


def test_default_ports_are_documented_ones():
    assert (DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT) == (8000, 8001)


def test_stop_lets_running_requests_finish_then_refuses_new_ones(served):
    handle = served.run(serve(served.backend, 0, 0, "127.0.0.1"))
    assert 0 not in (handle.http_port, handle.grpc_port) and handle.http_port != handle.grpc_port
    http = openai.OpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key="unused", max_retries=0)
    grpc_client = triton.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
    responses: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: responses.put((result, error)))
    grpc_client.async_stream_infer(
        MODEL, text_input(PROMPT, '{"max_tokens": 200, "ignore_eos": true}'), request_id="draining"
    )
    stream = http.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = [next(iter(stream))]
    assert responses.get(timeout=30)[1] is None
    assert served.backend.stats()["num_running"] == 2  # both are mid-generation when stop() begins

    stopping = asyncio.run_coroutine_threadsafe(handle.stop(grace_s=30), served.loop)
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    while True:
        result, error = responses.get(timeout=30)
        assert error is None
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    assert result.as_numpy("finish_reason")[0] == b"length"
    grpc_client.stop_stream()  # the client half-closes: the stream call ends, so the drain can too
    stopping.result(30)

    with pytest.raises(openai.APIConnectionError):
        http.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert not _grpc_live(grpc_client)
    grpc_client.close()
    http.close()
    served.wait_all_blocks_free()


def _grpc_live(client) -> bool:
    try:
        return client.is_server_live(client_timeout=2)
    except triton.InferenceServerException:
        return False


def test_stop_cuts_what_outlasts_the_grace_period_with_an_error_that_says_so(served):
    handle = served.run(serve(served.backend, 0, 0, "127.0.0.1"))
    grpc_client = triton.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
    responses: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: responses.put((result, error)))
    grpc_client.async_stream_infer(
        MODEL, text_input(PROMPT, '{"max_tokens": 400, "ignore_eos": true}'), request_id="long"
    )
    assert responses.get(timeout=30)[1] is None
    with openai.OpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key="unused", max_retries=0) as http:
        stream = http.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        served.run(handle.stop(grace_s=0.1))
        # Not a silent close: an error event, then [DONE].
        with pytest.raises(openai.APIError, match="the server is shutting down"):
            list(stream)
    while True:  # the gRPC stream's request ends with an error response naming the shutdown
        result, error = responses.get(timeout=30)
        if error is not None:
            break
    assert "UNAVAILABLE: the server is shutting down" in error.message()
    grpc_client.stop_stream()
    grpc_client.close()
    served.wait_all_blocks_free()


def test_during_the_drain_new_requests_get_503_not_a_refused_connection(served):
    handle = served.run(serve(served.backend, 0, 0, "127.0.0.1"))
    with openai.OpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key="unused", max_retries=0) as http:
        stream = http.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        stopping = asyncio.run_coroutine_threadsafe(handle.stop(grace_s=30), served.loop)
        while not handle.serving.draining:
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError, match="shutting down") as info:
            http.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 503
        with triton.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}") as grpc_client:
            with pytest.raises(triton.InferenceServerException) as grpc_info:
                grpc_client.infer(MODEL, text_input(PROMPT, '{"max_tokens": 2}')[:2])
        assert grpc_info.value.status() == "StatusCode.UNAVAILABLE" and "shutting down" in grpc_info.value.message()
        assert list(stream)[-1].choices[0].finish_reason == "length"  # the running one finishes
    stopping.result(30)
    served.wait_all_blocks_free()

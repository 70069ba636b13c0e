"""Request validation shared by both frontends, and the OpenAI body parsing, without a server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.tokenizer import load_tokenizer
from proto.kserve import grpc_service_pb2 as pb
from router.kserve import parse_infer_request, serialize_bytes
from router.openai_protocol import chat_prompt_ids, parse_chat, parse_completion
from router.requests import BadRequest, UnknownModel, make_request


@pytest.fixture(scope="module")
def backend(tiny_llama_dir):
    return SimpleNamespace(model_name="m", max_model_len=64, tokenizer=load_tokenizer(tiny_llama_dir))


def test_ids_are_unique_and_max_tokens_defaults_fit_the_context(backend):
    a = make_request(backend, "x", [5] * 60, {}, prompt_param="prompt")
    b = make_request(backend, "x", [5] * 10, {"temperature": 0.5, "stop": ["."]}, prompt_param="prompt")
    assert a.request_id != b.request_id and a.request_id.startswith("x-")
    assert a.params.max_tokens == 4 and b.params.max_tokens == 16  # cut to the room left / the default
    assert b.params.stop == (".",) and b.params.temperature == 0.5
    unbounded = make_request(backend, "x", [5] * 10, {}, prompt_param="messages", default_max_tokens=None)
    assert unbounded.params.max_tokens == 54


@pytest.mark.parametrize("fields, param", [
    ({"top_k": 1.5}, "top_k"), ({"ignore_eos": 1}, "ignore_eos"), ({"stop": [1]}, "stop"),
    ({"top_p": 0}, "top_p"), ({"seed": "7"}, "seed"), ({"beam_width": 2}, "beam_width"),
    ({"max_tokens": 61}, "max_tokens"),
])
def test_each_bad_field_is_named(backend, fields, param):
    with pytest.raises(BadRequest) as info:
        make_request(backend, "x", [5] * 4, fields, prompt_param="prompt")
    assert info.value.param == param and param in str(info.value)


def test_kserve_request_from_tensors(backend):
    msg = pb.ModelInferRequest(model_name="m", id="client-7")
    msg.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    msg.inputs.add(name="stream", datatype="BOOL", shape=[1])
    msg.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    msg.raw_input_contents.extend([serialize_bytes(b"Once"), b"\x01",
                                   serialize_bytes(b'{"max_tokens": "5", "temperature": 0, "stop": "x"}')])
    request = parse_infer_request(backend, msg)
    assert request.stream and request.client_id == "client-7"
    assert request.generate.prompt_token_ids == tuple(backend.tokenizer.encode("Once"))
    assert request.generate.params.max_tokens == 5 and request.generate.params.stop == ("x",)
    msg.model_version = "2"
    with pytest.raises(UnknownModel, match="no version '2'"):
        parse_infer_request(backend, msg)
    msg.model_version = ""
    msg.raw_input_contents[0] = b"\x09\x00\x00\x00short"
    with pytest.raises(BadRequest, match="runs past the end"):
        parse_infer_request(backend, msg)


def test_openai_bodies(backend):
    completion = parse_completion({"model": "m", "prompt": ["Once"], "stream": True,
                                   "stream_options": {"include_usage": True}, "user": "ignored"}, backend)
    assert completion.stream and completion.include_usage and not completion.chat
    with pytest.raises(BadRequest, match="only|one prompt"):
        parse_completion({"model": "m", "prompt": ["a", "b"]}, backend)
    with pytest.raises(BadRequest) as info:
        parse_completion({"model": "m", "prompt": "a", "stream": "yes"}, backend)
    assert info.value.param == "stream"
    chat = parse_chat({"model": "m", "max_completion_tokens": 3,
                       "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, backend)
    assert chat.chat and chat.generate.params.max_tokens == 3
    with pytest.raises(BadRequest) as info:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, backend)
    assert info.value.param == "messages[0].content"


def test_chat_uses_the_tokenizers_own_template(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert ids == tokenizer.encode("<user>hi<assistant>", add_special_tokens=False)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(BadRequest, match="roles must alternate"):
        chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])

"""Request validation shared by both frontends, and the OpenAI body parsing, without a server."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from engine.tokenizer import load_tokenizer
from proto.kserve import grpc_service_pb2 as pb
from router.kserve import parse_infer_request, serialize_bytes
from router.openai_protocol import chat_prompt_ids, parse_chat, parse_completion
from router.requests import BadRequest, PromptEncoder, UnknownModel, make_request


@pytest.fixture(scope="module")
def backend(tiny_llama_dir):
    return SimpleNamespace(model_name="m", max_model_len=64, tokenizer=load_tokenizer(tiny_llama_dir))


@pytest.fixture(scope="module")
def encoder(backend):
    return PromptEncoder(backend.tokenizer, backend.max_model_len)


def run(coro):
    return asyncio.run(coro)


def test_ids_are_unique_and_max_tokens_defaults_fit_the_context(backend):
    a = make_request(backend, "x", [5] * 60, {}, prompt_param="prompt")
    b = make_request(backend, "x", [5] * 10, {"temperature": 0.5, "stop": ["."]}, prompt_param="prompt")
    assert a.request_id != b.request_id and a.request_id.startswith("x-")
    assert a.params.max_tokens == 4 and b.params.max_tokens == 16  # cut to the room left / the default
    assert b.params.stop == (".",) and b.params.temperature == 0.5
    unbounded = make_request(backend, "x", [5] * 10, {}, prompt_param="messages", default_max_tokens=None)
    assert unbounded.params.max_tokens == 54


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"top_k": 1.5}, "top_k"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"stop": [1]}, "stop"),
        ({"top_p": 0}, "top_p"),
        ({"seed": "7"}, "seed"),
        ({"beam_width": 2}, "beam_width"),
        ({"max_tokens": 61}, "max_tokens"),
    ],
)
def test_each_bad_field_is_named(backend, fields, param):
    with pytest.raises(BadRequest) as info:
        make_request(backend, "x", [5] * 4, fields, prompt_param="prompt")
    assert info.value.param == param and param in str(info.value)


def kserve_msg(text: bytes = b"Once", sampling: bytes = b"{}", shape=(1,)) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="text_input", datatype="BYTES", shape=list(shape))
    msg.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    msg.raw_input_contents.extend([serialize_bytes(text), serialize_bytes(sampling)])
    return msg


def test_kserve_request_from_tensors(backend, encoder):
    msg = pb.ModelInferRequest(model_name="m", id="client-7")
    msg.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    msg.inputs.add(name="stream", datatype="BOOL", shape=[1])
    msg.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    msg.raw_input_contents.extend(
        [serialize_bytes(b"Once"), b"\x01", serialize_bytes(b'{"max_tokens": "5", "temperature": 0, "stop": "x"}')]
    )
    request = run(parse_infer_request(backend, encoder, msg))
    assert request.stream and request.client_id == "client-7"
    assert request.generate.prompt_token_ids == tuple(backend.tokenizer.encode("Once"))
    assert request.generate.params.max_tokens == 5 and request.generate.params.stop == ("x",)
    msg.model_version = "2"
    with pytest.raises(UnknownModel, match="no version '2'"):
        run(parse_infer_request(backend, encoder, msg))
    msg.model_version = ""
    msg.raw_input_contents[0] = b"\x09\x00\x00\x00short"
    with pytest.raises(BadRequest, match="runs past the end"):
        run(parse_infer_request(backend, encoder, msg))


def test_openai_bodies(backend, encoder):
    completion = run(
        parse_completion(
            {
                "model": "m",
                "prompt": ["Once"],
                "stream": True,
                "stream_options": {"include_usage": True},
                "user": "ignored",
            },
            backend,
            encoder,
        )
    )
    assert completion.stream and completion.include_usage and not completion.chat
    with pytest.raises(BadRequest, match="only|one prompt"):
        run(parse_completion({"model": "m", "prompt": ["a", "b"]}, backend, encoder))
    with pytest.raises(BadRequest) as info:
        run(parse_completion({"model": "m", "prompt": "a", "stream": "yes"}, backend, encoder))
    assert info.value.param == "stream"
    chat = run(
        parse_chat(
            {
                "model": "m",
                "max_completion_tokens": 3,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            },
            backend,
            encoder,
        )
    )
    assert chat.chat and chat.generate.params.max_tokens == 3
    with pytest.raises(BadRequest) as info:
        run(
            parse_chat(
                {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, backend, encoder
            )
        )
    assert info.value.param == "messages[0].content"


def test_chat_uses_the_tokenizers_own_template(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    encoder = PromptEncoder(tokenizer, 64)
    ids = run(chat_prompt_ids(encoder, [{"role": "user", "content": "hi"}]))
    assert ids == tokenizer.encode("<user>hi<assistant>", add_special_tokens=False)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(BadRequest, match="roles must alternate"):
        run(chat_prompt_ids(encoder, [{"role": "user", "content": "hi"}]))


@pytest.mark.parametrize("shape", [(-1,), (0,), (2,), (1, 2), (1, -1)])
def test_kserve_shapes_other_than_one_element_are_refused(backend, encoder, shape):
    with pytest.raises(BadRequest, match=r"must have a shape of one element, \[1\]") as info:
        run(parse_infer_request(backend, encoder, kserve_msg(shape=shape)))
    assert info.value.param == "text_input"


def test_kserve_accepts_one_element_in_any_rank(backend, encoder):
    request = run(parse_infer_request(backend, encoder, kserve_msg(shape=(1, 1))))
    assert request.generate.prompt_token_ids


def test_empty_text_and_lone_surrogates_are_named(backend, encoder):
    with pytest.raises(BadRequest, match="text_input is empty"):
        run(parse_infer_request(backend, encoder, kserve_msg(text=b"")))
    with pytest.raises(BadRequest, match="prompt is empty"):
        run(parse_completion({"model": "m", "prompt": ""}, backend, encoder))
    lone = json.loads('"Once \\ud800 upon"')
    with pytest.raises(BadRequest, match="lone surrogate U\\+D800 at character 5") as info:
        run(parse_completion({"model": "m", "prompt": lone}, backend, encoder))
    assert info.value.param == "prompt"
    with pytest.raises(BadRequest, match="lone surrogate") as info:
        run(parse_chat({"model": "m", "messages": [{"role": "user", "content": lone}]}, backend, encoder))
    assert info.value.param == "messages[0].content"


def test_deep_json_in_sampling_parameters_is_a_bad_request(backend, encoder):
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(BadRequest, match="nested too deeply") as info:
        run(parse_infer_request(backend, encoder, kserve_msg(sampling=deep)))
    assert info.value.param == "sampling_parameters"


def test_values_quoted_in_errors_are_short(backend, encoder):
    huge = {"model": "m", "prompt": [[[[list(range(100_000))]]]]}
    with pytest.raises(BadRequest) as info:
        run(parse_completion(huge, backend, encoder))
    assert len(str(info.value)) < 300
    with pytest.raises(UnknownModel) as info:
        run(parse_completion({"model": "x" * 1_000_000, "prompt": "a"}, backend, encoder))
    assert len(str(info.value)) < 300


def test_text_too_long_to_fit_is_refused_before_tokenizing(backend, encoder, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("tokenized text that cannot fit")

    monkeypatch.setattr(backend.tokenizer, "encode", never)
    text = "a" * (encoder.max_chars + 1)
    with pytest.raises(BadRequest, match="more than any prompt that fits the context window of 64 tokens"):
        run(parse_completion({"model": "m", "prompt": text}, backend, encoder))
    with pytest.raises(BadRequest, match="more than any prompt that fits"):
        run(parse_chat({"model": "m", "messages": [{"role": "user", "content": text}]}, backend, encoder))


def test_the_character_bound_never_refuses_text_that_fits(backend, encoder):
    # The bound must be safe: the text with the most characters per token still fits under it.
    vocab = backend.tokenizer.get_vocab()
    longest = max(vocab, key=len)
    text = backend.tokenizer.decode([vocab[longest]] * 40)
    assert len(backend.tokenizer.encode(text)) <= 64 and len(text) <= encoder.max_chars
    run(parse_completion({"model": "m", "prompt": text}, backend, encoder))

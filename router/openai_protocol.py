"""OpenAI request bodies -> Tandem requests, and Tandem output -> OpenAI response bodies.

Supported: /v1/completions and /v1/chat/completions with one choice (n=1), sampling fields
temperature, top_p, max_tokens (chat: also max_completion_tokens), seed, stop, and vLLM's
extensions top_k, ignore_eos, stop_token_ids. Fields that would change the output in ways
Tandem does not implement (n > 1, logprobs, echo, penalties, tools, ...) are refused with a
400 naming them; other unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from router.requests import (
    SAMPLING_FIELDS,
    BadRequest,
    GenerateRequest,
    PromptEncoder,
    brief,
    check_model,
    check_text,
    make_request,
)

# Used when the tokenizer has no chat template of its own: one "role: content" line per
# message, then "assistant:" for the model to continue.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
CHAT_ROLES = ("system", "developer", "user", "assistant")

# Field -> the values that mean "not used", the only ones accepted.
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "suffix": ("",),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}


@dataclass(frozen=True)
class OpenAIRequest:
    generate: GenerateRequest
    chat: bool  # /v1/chat/completions, else /v1/completions
    model: str
    stream: bool  # answer with server-sent events
    include_usage: bool  # stream_options.include_usage: a last chunk with token counts
    created: int  # unix seconds, in the response and every chunk


def _optional(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise BadRequest(f"{name} must be {kind.__name__}, got {brief(value)}", name)
    return value


def _common(body: Any, backend) -> tuple[dict, bool, bool]:
    """Checks both endpoints share; returns sampling fields, stream and include_usage."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") is None:
        raise BadRequest("model is missing", "model")
    check_model(backend, body["model"])
    for name, unused in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in unused:
            raise BadRequest(f"{name}={brief(body[name])} is not supported; leave it unset", name)
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, {})
    include_usage = options.get("include_usage") is True
    fields = {name: body[name] for name in SAMPLING_FIELDS if name in body}
    return fields, stream, include_usage


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


async def parse_completion(body: Any, backend, encoder: PromptEncoder) -> OpenAIRequest:
    fields, stream, include_usage = _common(body, backend)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_ids(prompt[0])):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        prompt_ids = await encoder.encode(prompt, "prompt")
    elif _is_token_ids(prompt):
        prompt_ids = prompt
    else:
        raise BadRequest(
            f"prompt must be a string or a list of token ids (one prompt per request), got {brief(prompt)}", "prompt"
        )
    generate = make_request(backend, "cmpl", prompt_ids, fields, prompt_param="prompt")
    return OpenAIRequest(generate, False, body["model"], stream, include_usage, int(time.time()))


def _message_text(message: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
        raise BadRequest(f"{where} must be an object with role one of {', '.join(CHAT_ROLES)}", f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise BadRequest(f"{where}.content parts must all be {{'type': 'text', 'text': ...}}", f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    if content:
        check_text(content, f"{where}.content")
    return {"role": message["role"], "content": content}


async def chat_prompt_ids(encoder: PromptEncoder, messages: list[dict]) -> list[int]:
    """The tokenizer's chat template (or FALLBACK_CHAT_TEMPLATE) applied, then tokenized."""
    if encoder.tokenizer is None:
        raise BadRequest("this model has no tokenizer, so it cannot serve chat", "messages")
    num_chars = sum(len(m["content"]) for m in messages)
    if num_chars > encoder.max_chars:
        raise BadRequest(
            f"messages have {num_chars} characters of content, more than any prompt that fits "
            f"the context window of {encoder.max_model_len} tokens can have ({encoder.max_chars})",
            "messages",
        )
    template = None if encoder.tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE
    try:
        text = await encoder.chat_template(messages, template)
    except Exception as exc:  # templates raise their own errors (e.g. roles must alternate)
        raise BadRequest(f"the chat template refused these messages: {exc}", "messages") from None
    # The template writes the special tokens (BOS) itself; encoding must not add them again.
    return await encoder.encode(text, "messages", add_special_tokens=False)


async def parse_chat(body: Any, backend, encoder: PromptEncoder) -> OpenAIRequest:
    fields, stream, include_usage = _common(body, backend)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    messages = [_message_text(m, i) for i, m in enumerate(messages)]
    if body.get("max_completion_tokens") is not None:
        fields["max_tokens"] = body["max_completion_tokens"]
    # No max_tokens: as many as fit, as OpenAI and vLLM do for chat.
    generate = make_request(
        backend,
        "chatcmpl",
        await chat_prompt_ids(encoder, messages),
        fields,
        prompt_param="messages",
        default_max_tokens=None,
    )
    return OpenAIRequest(generate, True, body["model"], stream, include_usage, int(time.time()))


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def _envelope(request: OpenAIRequest, kind: str, choices: list[dict]) -> dict:
    return {
        "id": request.generate.request_id,
        "object": kind,
        "created": request.created,
        "model": request.model,
        "choices": choices,
    }


def response_body(request: OpenAIRequest, text: str, finish_reason: str | None, token_counts: dict) -> dict:
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice.update(finish_reason=finish_reason, logprobs=None)
    kind = "chat.completion" if request.chat else "text_completion"
    return {**_envelope(request, kind, [choice]), "usage": token_counts}


def chunk_body(request: OpenAIRequest, text: str, finish_reason: str | None, first: bool) -> dict:
    if request.chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text}
    choice.update(finish_reason=finish_reason, logprobs=None)
    return _envelope(request, "chat.completion.chunk" if request.chat else "text_completion", [choice])


def usage_chunk_body(request: OpenAIRequest, token_counts: dict) -> dict:
    kind = "chat.completion.chunk" if request.chat else "text_completion"
    return {**_envelope(request, kind, []), "usage": token_counts}

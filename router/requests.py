"""What both frontends share before a request reaches the backend: ids, checks, tokens.

A frontend parses its wire format (KServe tensors, OpenAI JSON) into plain values, then
`make_request` validates them into a GenerateRequest. Every error a client can cause is a
BadRequest that names the offending field, so both frontends report it the same way.

Nothing a client sends may stall the event loop that serves every other client:
PromptEncoder refuses text that cannot fit the context window before tokenizing it, and
tokenizes long text on a worker thread; values quoted back in errors are cut short.
"""

from __future__ import annotations

import asyncio
import reprlib
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from engine.sampling_params import SamplingParams
from proto.serving import GenerateRequest

# Text up to this many characters is tokenized on the event loop: a thread hop would cost
# more than the tokenizing (tens of microseconds).
INLINE_TOKENIZE_CHARS = 2048
_brief_repr = reprlib.Repr()  # attributes, not keywords: Python 3.11's Repr takes none
_brief_repr.maxlevel, _brief_repr.maxstring, _brief_repr.maxother = 3, 60, 60
_brief_repr.maxlist, _brief_repr.maxdict, _brief_repr.maxlong = 6, 6, 40


def brief(value: Any) -> str:
    """A client's value quoted in an error: short, whatever its size or depth."""
    return _brief_repr.repr(value)


# Sampling fields a request may set -> the JSON type each accepts. JSON true is not a
# number here, even though Python's bool is an int.
SAMPLING_FIELDS: dict[str, str] = {
    "temperature": "number",
    "top_p": "number",
    "top_k": "integer",
    "max_tokens": "integer",
    "seed": "integer",
    "stop": "strings",
    "stop_token_ids": "integers",
    "ignore_eos": "boolean",
}
_TYPE_NAMES = {
    "number": "a number",
    "integer": "an integer",
    "boolean": "true or false",
    "strings": "a string or a list of strings",
    "integers": "a list of integers",
}
DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions API and vLLM's SamplingParams


class BadRequest(ValueError):
    """A client's mistake: gRPC INVALID_ARGUMENT, HTTP 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the offending field, as the client spelled it


class UnknownModel(BadRequest):
    """The request names a model this router does not serve: gRPC NOT_FOUND, HTTP 404."""


def new_request_id(prefix: str) -> str:
    # Client-supplied ids (KServe `id`) may repeat across clients, so the backend never sees them.
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(backend, name: Any, param: str = "model") -> None:
    if not isinstance(name, str) or name != backend.model_name:
        raise UnknownModel(f"model {brief(name)} is not served here; the served model is {backend.model_name!r}", param)


def check_text(text: str, param: str) -> None:
    """Text a tokenizer can take: not empty, and valid Unicode (JSON can carry lone surrogates)."""
    if not text:
        raise BadRequest(f"{param} is empty: it must hold some text", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(
            f"{param} is not valid Unicode text: it holds a lone surrogate "
            f"U+{ord(text[exc.start]):04X} at character {exc.start}",
            param,
        ) from None


def _longest_token_chars(tokenizer) -> int:
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


class PromptEncoder:
    """Turns prompt text into token ids without stalling the event loop.

    A token never covers more characters than the longest entry of the vocabulary, so text
    longer than max_model_len times that (doubled, for normalizers that merge characters)
    cannot fit the context window: it is refused before any tokenizing. Long text that may
    fit is tokenized on a worker thread.
    """

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_chars = 2 * max_model_len * _longest_token_chars(tokenizer) if tokenizer is not None else 0

    @property
    def max_request_bytes(self) -> int:
        """A bound on any request that can fit: the longest text as JSON (6 bytes for an
        escaped character) or the longest list of token ids, plus room for the rest."""
        return 8 * max(self.max_chars, self.max_model_len) + (1 << 20)

    def check(self, text: str, param: str) -> None:
        if self.tokenizer is None:
            raise BadRequest("this model has no tokenizer, so prompts must be token ids", param)
        check_text(text, param)
        if len(text) > self.max_chars:
            raise BadRequest(
                f"{param} has {len(text)} characters, more than any prompt that fits the "
                f"context window of {self.max_model_len} tokens can have ({self.max_chars})",
                param,
            )

    async def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt string, with the special tokens (BOS) the engine would add."""
        self.check(text, param)
        return await self._off_loop(len(text), self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def chat_template(self, messages: list[dict], template: str | None) -> str:
        """The chat template applied (raises what the template raises)."""
        return await self._off_loop(
            sum(len(m["content"]) for m in messages),
            self.tokenizer.apply_chat_template,
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )

    @staticmethod
    async def _off_loop(num_chars: int, fn, *args, **kwargs):
        if num_chars <= INLINE_TOKENIZE_CHARS:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(name: str, value: Any, param: str) -> None:
    kind = SAMPLING_FIELDS[name]
    ok = {
        "number": _is_int(value) or isinstance(value, float),
        "integer": _is_int(value),
        "boolean": isinstance(value, bool),
        "strings": isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)),
        "integers": isinstance(value, list) and all(_is_int(t) for t in value),
    }[kind]
    if not ok:
        raise BadRequest(f"{param} must be {_TYPE_NAMES[kind]}, got {brief(value)}", param)


def sampling_params(fields: Mapping[str, Any], param_prefix: str = "") -> SamplingParams:
    """SamplingParams from JSON-like fields (None = unset); errors name `param_prefix + field`."""
    kwargs = {}
    for name, value in fields.items():
        param = param_prefix + name
        if name not in SAMPLING_FIELDS:
            raise BadRequest(
                f"unknown sampling field {brief(param)}; known fields: {', '.join(SAMPLING_FIELDS)}", param
            )
        if value is None:
            continue
        _check_type(name, value, param)
        try:
            # Each field is validated on its own first, so the error can name that field.
            SamplingParams(**{name: value})
        except ValueError as exc:
            raise BadRequest(f"{param}: {exc}", param) from None
        kwargs[name] = value
    return SamplingParams(**kwargs)


def make_request(
    backend,
    prefix: str,
    prompt_token_ids: list[int],
    fields: Mapping[str, Any],
    *,
    prompt_param: str,
    param_prefix: str = "",
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> GenerateRequest:
    """Validate a prompt and its sampling fields against the backend's context window.

    An explicit max_tokens that does not fit beside the prompt is an error; a default one
    (`default_max_tokens`, None = as many as fit) is cut to fit.
    """
    explicit = fields.get("max_tokens") is not None
    params = sampling_params(fields, param_prefix)
    if not prompt_token_ids:
        raise BadRequest(f"{prompt_param} is empty: it must contain at least one token", prompt_param)
    room = backend.max_model_len - len(prompt_token_ids)
    if room <= 0:
        raise BadRequest(
            f"{prompt_param} has {len(prompt_token_ids)} tokens, but this model's "
            f"context window is {backend.max_model_len} tokens including at least "
            f"one output token",
            prompt_param,
        )
    if explicit and params.max_tokens > room:
        param = param_prefix + "max_tokens"
        raise BadRequest(
            f"{param}={params.max_tokens} does not fit: the prompt has "
            f"{len(prompt_token_ids)} tokens and the context window is "
            f"{backend.max_model_len}, leaving room for {room}",
            param,
        )
    if not explicit:
        params = replace(params, max_tokens=min(default_max_tokens or room, room))
    return GenerateRequest(new_request_id(prefix), tuple(prompt_token_ids), params)

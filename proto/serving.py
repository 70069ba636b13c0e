"""What a request's stream looks like as it crosses from workers to the router."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from proto.kv import KVLayout

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    """How a request ended. A str (its value), so that it is the OpenAI / KServe string as is."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached, or the model's context window is full
    ABORT = "abort"  # cancelled by the caller, or by the server
    ERROR = "error"  # failed: on its own (its sampling, its text) or with its worker (see TokenDelta.retryable)


class Role(enum.StrEnum):
    """What a worker does."""

    PREFILL = "prefill"  # computes prompts and sends their KV
    DECODE = "decode"  # receives KV (or prefills short prompts itself) and decodes
    COLOCATED = "colocated"  # both phases in one engine, no KV moved


@dataclass(frozen=True)
class WorkerStats:
    """A worker's gauges, as its stats() reports them (rank 0 of a tensor-parallel worker)."""

    num_waiting: int  # requests waiting to be scheduled (decode: also reservations waiting for room)
    num_running: int  # requests in the running batch
    num_reserved: int  # decode: requests whose blocks wait for their KV
    num_held: int  # finished requests whose blocks a KV transfer still reads (prefill) or writes
    num_transfers: int  # KV transfers this worker takes part in now
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int  # since start: a measure of KV memory pressure

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def gauges(self) -> dict[str, float]:
        """Every field, and kv_usage, by name (what /metrics exports per worker)."""
        return {**{f.name: float(getattr(self, f.name)) for f in fields(self)}, "kv_usage": self.kv_usage}


@dataclass(frozen=True)
class StepRecord:
    """One step a worker's engine ran while serving: what it computed, in the terms of the
    planner's latency model (Coefficients.step_ms), and how long its turn took, from
    scheduling to the last of its outputs handed on (so: the forward, sampling, post-processing,
    the KV transfers the step starts, and the engine's share of the process's cores)."""

    prefill_tokens: int
    attn_tokens2: int
    num_decodes: int
    context_tokens: int
    ms: float
    # When the step started, time.monotonic() seconds: comparable between the processes of
    # one machine, so that steps of workers sharing it can be lined up (0: not recorded).
    at_s: float = 0.0


@dataclass(frozen=True)
class Resume:
    """What a request had streamed to its client when its worker was lost: a worker given it
    prefills prompt + token_ids and continues after them as if it had generated them (the
    same max_tokens, stop conditions and seeded randomness), streaming only what is new."""

    token_ids: tuple[int, ...]  # generated tokens the client has
    text: str  # the text the client has: those tokens' text, less any held back for a stop string

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(self.token_ids))


@dataclass(frozen=True)
class GenerateRequest:
    """One request, validated, as it travels from a frontend to the workers: the only argument
    a worker needs to start it (reserve, prefill, or generate here)."""

    request_id: str  # unique in the router; the id every worker knows it by
    prompt_token_ids: tuple[int, ...]  # the whole prompt, special tokens included
    params: SamplingParams
    resume: Resume | None = None  # recovery: continue after what was streamed (generate only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))  # lists accepted, frozen


@dataclass(frozen=True)
class TokenDelta:
    """Tokens and text a request produced since its previous delta."""

    request_id: str
    token_ids: tuple[int, ...]  # new tokens, in order
    text: str  # new final text (detokenized by the worker; stop strings already cut)
    finished: bool  # the last delta of this request
    finish_reason: FinishReason | None  # once finished
    num_prompt_tokens: int  # prompt length in tokens
    num_cached_tokens: int  # prompt tokens that came from the prefix cache
    error: str | None = None  # why the request failed (finish_reason "error"), else None
    # For an "error": True when the cause is the server's state (a worker died or broke, the
    # server is shutting down), so the same request may succeed if retried (gRPC UNAVAILABLE,
    # HTTP 503); False when the request failed on its own (INTERNAL, 500).
    retryable: bool = False

    def __post_init__(self) -> None:
        if self.finish_reason is not None and not isinstance(self.finish_reason, FinishReason):
            object.__setattr__(self, "finish_reason", FinishReason(self.finish_reason))  # "stop" accepted

    def then(self, later: TokenDelta) -> TokenDelta:
        """This delta and the next one of the same request as one: their tokens and text in
        order, the later one's end (a final delta from outside a step counts no prompt)."""
        if later.request_id != self.request_id:
            raise ValueError(f"cannot join deltas of {self.request_id} and {later.request_id}")
        return replace(
            later,
            token_ids=self.token_ids + later.token_ids,
            text=self.text + later.text,
            num_prompt_tokens=later.num_prompt_tokens or self.num_prompt_tokens,
            num_cached_tokens=later.num_cached_tokens or self.num_cached_tokens,
        )


def final_delta(request_id: str, reason: FinishReason, error: str | None = None, retryable: bool = True) -> TokenDelta:
    """A request's last delta when it ends outside a step: aborted, or failed by the server's
    state (retryable: a broken engine, a lost worker), unless told otherwise."""
    return TokenDelta(request_id, (), "", True, reason, 0, 0, error=error, retryable=retryable)


@dataclass(frozen=True)
class KVHandle:
    """Where a prefill worker must push a request's KV: a decode worker reserved blocks for it
    and registered them with its receivers, which tell each sender the block ids (Accept)."""

    request_id: str
    endpoints: tuple[str, ...]  # the KV receivers of every rank of the decode worker


DETACHED = "detached to migrate"  # the error of the "abort" delta that ends a detached request's stream


@dataclass(frozen=True)
class Detached:
    """A decoding request taken out of its worker's batch to migrate it, its blocks kept there
    (DecodeClient.detach)."""

    request_id: str
    num_tokens: int  # prompt and generated tokens, the newest included (its KV is not computed yet)
    block_ids: tuple[int, ...]  # the blocks holding the KV of all tokens but the newest, in order


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill worker returns once the prompt is computed."""

    request_id: str
    first_token_id: int  # sampled from the prompt's last position


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker's engine settled on (defaults resolved), for the router."""

    max_model_len: int  # prompt plus output tokens at most
    layout: KVLayout  # this rank's KV cache: block size, dtype, heads, TP rank and size
    cores: tuple[int, ...] = ()  # the CPU cores any thread of rank 0's process may run on
    num_threads: int = 0  # torch's compute threads in rank 0's process

"""A TP=1 prefill worker feeding a tensor-parallel decode worker (TP=2, two processes), without Ray.

Rank 1 of the decode worker runs in its own process; rank 0 talks to it over the ranks'
process group only (registrations, cancels and settlements travel with the engine's turns),
as on Ray. Each decode rank receives its own KV heads from the one prefill sender. The
tokens must equal transformers'; every block must come back on rank 0 and no part may be
left open on rank 1, whichever way a request ends. A pipe lets the test look into rank 1
(its open parts) and make it fail (refuse an id, cancel a part).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import replace

import pytest

from decode_worker.follower import DecodeFollower
from decode_worker.worker import DecodeWorker, TransferFailed
from engine import EngineConfig, SamplingParams
from prefill_worker.worker import PrefillWorker
from proto.serving import GenerateRequest
from tests.checkpoints import hf_greedy
from tests.kv_transfer.peer import TEST_SECRET
from tests.ports import free_port
from tests.workers.test_disaggregated import all_blocks_free, assert_oracle, run_request, wait_for

BACKEND = "shm"
CONFIG = EngineConfig(dtype="float32", max_num_batched_tokens=32, num_blocks=64, max_model_len=256)
DEADLINE_S = 5.0


def follower_main(model_dir: str, dist_init: str, conn) -> None:
    """Rank 1, with a pipe for the test: "count" (parts open), "refuse" (an id it will not
    register), "cancel" (one of its parts), "close" (after rank 0 closed the group)."""
    follower = DecodeFollower(
        model_dir, replace(CONFIG, tensor_parallel_size=2), BACKEND, "127.0.0.1", 1, dist_init, kv_secret=TEST_SECRET
    )
    refused: set[str] = set()
    expect = follower.receiver.expect

    def refusing_expect(transfer_id, *args, **kwargs):
        if transfer_id in refused:
            raise RuntimeError(f"rank 1 refuses {transfer_id}")
        return expect(transfer_id, *args, **kwargs)

    follower.receiver.expect = refusing_expect  # type: ignore[method-assign]
    while True:
        op, *args = conn.recv()
        if op == "count":
            conn.send(follower.num_transfers())
        elif op == "refuse":
            refused.add(args[0])
            conn.send(None)
        elif op == "cancel":
            with follower._lock:
                part = follower._transfers.get(args[0])
            conn.send(part is not None)
            if part is not None:
                part.cancel(args[1])
        elif op == "close":
            follower.close()
            conn.send(None)
            return


class Rank1:
    """The test's line into rank 1."""

    def __init__(self, conn):
        self.conn = conn

    def call(self, *msg):
        self.conn.send(msg)
        assert self.conn.poll(60), f"rank 1 did not answer {msg[0]}"
        return self.conn.recv()

    def num_transfers(self) -> int:
        return self.call("count")


@pytest.fixture(scope="module")
def tp_decode(tiny_llama_dir):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    dist_init = f"tcp://127.0.0.1:{free_port()}"
    proc = ctx.Process(target=follower_main, args=(str(tiny_llama_dir), dist_init, child), daemon=True)
    proc.start()
    rank1 = Rank1(parent)
    decode = DecodeWorker(
        tiny_llama_dir,
        replace(CONFIG, tensor_parallel_size=2),
        BACKEND,
        transfer_timeout_s=DEADLINE_S,
        dist_init=dist_init,
        kv_secret=TEST_SECRET,
    )
    prefill = PrefillWorker(tiny_llama_dir, CONFIG, BACKEND, transfer_timeout_s=DEADLINE_S, kv_secret=TEST_SECRET)
    yield prefill, decode, rank1
    prefill.close()
    decode.close()
    rank1.call("close")
    proc.join(60)


def all_settled(decode, rank1, timeout_s=5.0) -> bool:
    """Every block back on rank 0, no part open on rank 1 nor awaited from it."""
    if not all_blocks_free(decode, timeout_s=timeout_s):
        return False
    deadline = time.monotonic() + timeout_s
    while rank1.num_transfers() or decode.stats().num_transfers or decode._open:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_decode_tp2_matches_transformers(tp_decode, tiny_llama_dir):
    prefill, decode, rank1 = tp_decode
    assert decode.engine.kv_cache.layout.num_kv_heads == 1 and prefill.engine.kv_cache.layout.num_kv_heads == 2
    assert_oracle(prefill, decode, tiny_llama_dir, "dtp")
    assert all_blocks_free(prefill) and all_settled(decode, rank1)


def test_handle_names_every_rank(tp_decode):
    _, decode, rank1 = tp_decode
    handle = decode.reserve(GenerateRequest("names", [5, 6, 7], SamplingParams(max_tokens=2)))
    assert handle.endpoints == decode.endpoints and len(set(handle.endpoints)) == 2
    decode.abort("names")
    assert all_settled(decode, rank1)


def test_kv_that_never_arrives_frees_blocks_on_both_ranks(tp_decode):
    _, decode, rank1 = tp_decode
    decode.reserve(GenerateRequest("lost", list(range(5, 40)), SamplingParams(max_tokens=4)))
    assert decode.wait_kv("lost", DEADLINE_S + 10)
    with pytest.raises(TransferFailed, match="did not arrive: rank 0: deadline"):
        decode.admit("lost", 5, lambda d: None)
    assert all_settled(decode, rank1)


def test_one_rank_failing_fails_the_request_and_frees_it(tp_decode):
    """Rank 1's part is cancelled: the prefill's push fails there, and the request may not run."""
    prefill, decode, rank1 = tp_decode
    params = SamplingParams(temperature=0.0, max_tokens=5)
    prompt = list(range(5, 50))
    handle = decode.reserve(GenerateRequest("half", prompt, params))
    assert rank1.call("cancel", "half", "test: rank 1 gives up")
    result = wait_for(lambda cb: prefill.prefill(GenerateRequest("half", prompt, params), handle, cb))
    assert decode.wait_kv("half", DEADLINE_S + 10)
    with pytest.raises(TransferFailed, match="did not arrive: rank"):
        decode.admit("half", getattr(result, "first_token_id", 0), lambda d: None)
    assert all_blocks_free(prefill) and all_settled(decode, rank1)


def test_abort_at_each_step_frees_both_ranks(tp_decode):
    prefill, decode, rank1 = tp_decode
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    prompt = list(range(5, 100))
    decode.reserve(GenerateRequest("a1", prompt, params))  # reserved only
    decode.abort("a1")
    handle = decode.reserve(GenerateRequest("a2", prompt, params))  # during the prefill
    prefill.prefill(GenerateRequest("a2", prompt, params), handle, lambda r: None)
    decode.abort("a2")
    prefill.abort("a2")
    handle = decode.reserve(GenerateRequest("a3", prompt, params))  # while decoding
    result = wait_for(lambda cb: prefill.prefill(GenerateRequest("a3", prompt, params), handle, cb))
    assert decode.wait_kv("a3", 10)
    started = threading.Event()
    decode.admit("a3", result.first_token_id, lambda d: started.set())
    assert started.wait(10)
    decode.abort("a3")
    assert all_blocks_free(prefill) and all_settled(decode, rank1)


def test_a_rank_refusing_registration_fails_reserve_only(tp_decode, tiny_llama_dir):
    prefill, decode, rank1 = tp_decode
    rank1.call("refuse", "refused")
    with pytest.raises(
        TransferFailed, match="could not register refused's blocks on every rank: rank 1: refused: rank 1 refuses"
    ):
        decode.reserve(GenerateRequest("refused", list(range(5, 40)), SamplingParams(max_tokens=3)))
    assert all_settled(decode, rank1)
    prompt = list(range(9, 30))  # the worker serves on
    tokens, _ = run_request(prefill, decode, "served", prompt, SamplingParams(temperature=0.0, max_tokens=4))
    assert tokens == hf_greedy(tiny_llama_dir, prompt, 4)
    assert all_blocks_free(prefill) and all_settled(decode, rank1)


def test_registrations_while_decoding_and_idle_turns(tp_decode, tiny_llama_dir):
    """Requests registered while another decodes (their orders ride its steps) and while idle
    (a turn without a batch) all run token-exact, with rank 1 hearing every one."""
    prefill, decode, rank1 = tp_decode
    params = SamplingParams(temperature=0.0, max_tokens=6)
    long_params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    long_prompt = list(range(11, 31))
    handle = decode.reserve(GenerateRequest("busy", long_prompt, long_params))
    result = wait_for(lambda cb: prefill.prefill(GenerateRequest("busy", long_prompt, long_params), handle, cb))
    assert decode.wait_kv("busy", 10)
    done = []
    decode.admit("busy", result.first_token_id, lambda d: done.append(d) if d.finished else None)
    for i in range(3):  # registered at the turns of "busy"'s steps
        prompt = list(range(20 + i, 40 + i))
        tokens, _ = run_request(prefill, decode, f"beside-{i}", prompt, params)
        assert tokens == hf_greedy(tiny_llama_dir, prompt, 6)
    deadline = time.monotonic() + 60
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done[0].finish_reason == "length"
    assert all_settled(decode, rank1)


def migrate(source, destination, rid, prompt, params, tokens_before=8):
    """Decode on source until tokens_before tokens came, migrate to destination (the
    router's steps, without the router), decode there to the end; returns every token."""
    from proto.serving import Resume

    tokens, text, enough, asked = [], [], threading.Event(), threading.Event()

    def on_delta(d):
        tokens.extend(d.token_ids)
        text.append(d.text)
        if len(tokens) >= tokens_before and not enough.is_set():
            enough.set()
            # Hold the source's loop (this runs on it) until the detach is asked: however fast
            # the machine, the request is then detached at the next turn, never finished first.
            asked.wait(30)

    source.generate(GenerateRequest(rid, prompt, params), on_delta)
    assert enough.wait(30)
    future = source.detach(rid)
    asked.set()
    detached = future.result(30)
    assert detached.num_tokens == len(prompt) + len(tokens)  # the stream ended after its last token
    moved = GenerateRequest(f"{rid}#1", prompt, params, resume=Resume(tuple(tokens), "".join(text)))
    handle = destination.reserve(moved)
    assert source.migrate_out(rid, handle).result(30) is None  # every rank's part is DONE
    assert destination.wait_kv(f"{rid}#1", 10)
    rest, finished = [], threading.Event()
    destination.admit(f"{rid}#1", tokens[-1], lambda d: (rest.extend(d.token_ids), d.finished and finished.set()))
    assert finished.wait(30)
    return tokens + rest


def test_a_request_migrates_between_tp1_and_tp2_decode_workers_both_ways(tp_decode, tiny_llama_dir):
    """Live migration between different TP sizes, without the router: TP=1 -> TP=2 (each
    TP=2 rank receives its heads from the one sender) and TP=2 -> TP=1 (each TP=2 rank sends
    its own heads: rank 0 orders rank 1's part at a turn and hears how it ended). Greedy
    tokens equal transformers'; every block is free on every rank afterwards."""
    _, decode, rank1 = tp_decode
    tp1 = DecodeWorker(tiny_llama_dir, CONFIG, BACKEND, transfer_timeout_s=DEADLINE_S, kv_secret=TEST_SECRET)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        for rid, src, dst in (("into-tp2", tp1, decode), ("out-of-tp2", decode, tp1)):
            prompt = list(range(8, 45)) if rid == "into-tp2" else list(range(12, 60))
            assert migrate(src, dst, rid, prompt, params) == hf_greedy(tiny_llama_dir, prompt, 30, True), rid
            assert all_blocks_free(tp1) and all_settled(decode, rank1), rid
    finally:
        tp1.close()


def test_a_failed_copy_out_of_the_tp2_worker_leaves_the_request_whole_there(tp_decode, tiny_llama_dir):
    """Every rank's part fails (the destination holds another deployment's KV secret): the
    copy fails as a whole, no rank freed anything, and the request is reattached and ends on
    the TP=2 worker, token-exact."""
    from proto.serving import Resume

    _, decode, rank1 = tp_decode
    stranger = DecodeWorker(tiny_llama_dir, CONFIG, BACKEND, kv_secret=b"another deployment's secret!!!!")
    try:
        prompt = list(range(20, 50))
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        tokens, text, enough, finished, asked = [], [], threading.Event(), threading.Event(), threading.Event()

        def on_delta(d):
            tokens.extend(d.token_ids)
            text.append(d.text)
            if len(tokens) >= 6 and not enough.is_set():
                enough.set()
                asked.wait(30)  # hold the loop until the detach is asked: never finished first
            if d.finished and d.finish_reason != "abort":
                finished.set()

        decode.generate(GenerateRequest("stay", prompt, params), on_delta)
        assert enough.wait(30)
        future = decode.detach("stay")
        asked.set()
        future.result(30)
        handle = stranger.reserve(
            GenerateRequest("stay#1", prompt, params, resume=Resume(tuple(tokens), "".join(text)))
        )
        with pytest.raises(TransferFailed, match="rank 0: .*rank 1: "):
            decode.migrate_out("stay", handle).result(30)
        stranger.abort("stay#1")
        decode.reattach("stay", on_delta)
        assert finished.wait(30)
        assert tokens == hf_greedy(tiny_llama_dir, prompt, 30, True)
        assert all_blocks_free(stranger) and all_settled(decode, rank1)
    finally:
        stranger.close()

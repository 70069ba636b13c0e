"""A TP=1 prefill worker feeding a tensor-parallel decode worker (TP=2, two processes), without Ray.

Rank 1 of the decode worker runs in its own process; rank 0 reaches it through a RankPort
over a pipe, as it does through actor calls on Ray. Each decode rank receives its own KV
heads from the one prefill sender. The tokens must equal transformers'; every block must
come back on rank 0 and no part may be left open on rank 1, whichever way a request ends.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from concurrent.futures import Future
from dataclasses import replace

import pytest

from decode_worker.worker import DecodeFollower, DecodeWorker, TransferFailed
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
    """Rank 1: a DecodeFollower serving rank 0's port requests from a pipe."""
    follower = DecodeFollower(
        model_dir, replace(CONFIG, tensor_parallel_size=2), BACKEND, "127.0.0.1", 1, dist_init, kv_secret=TEST_SECRET
    )
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    send(("endpoint", follower.endpoint))
    while True:
        op, *args = conn.recv()
        if op == "expect":
            rid = args[0]
            part = follower.expect(*args)
            send(("expected", rid))
            part.add_done_callback(lambda f, rid=rid: send(("settled", rid, f.result())))
        elif op == "cancel":
            follower.cancel(*args)
        elif op == "count":
            send(("count", follower.num_transfers()))
        elif op == "close":  # after rank 0 closed the group
            follower.close()
            send(("closed",))
            return


class PipePort:
    """A RankPort to rank 1 over a pipe; a reader thread routes its replies."""

    def __init__(self, conn):
        self.conn = conn
        self.endpoint = None
        self._replies: dict[tuple, Future] = {}  # (op, rid) -> the future waiting for it
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _await(self, key: tuple) -> Future:
        with self._lock:
            return self._replies.setdefault(key, Future())

    def _read(self) -> None:
        while True:
            op, *args = self.conn.recv()
            key, value = (op, args[0] if op in ("expected", "settled") else None), args[-1] if args else None
            self._await(key).set_result(value)
            if op == "closed":
                return

    def call(self, op: str, *args, reply: tuple):
        with self._lock:  # the reply may not have a waiter yet: create it before sending
            future = self._replies.setdefault(reply, Future())
        self.conn.send((op, *args))
        return future

    def expect(self, request_id, block_ids, timeout_s) -> Future:
        settled = self._await(("settled", request_id))
        self.call("expect", request_id, list(block_ids), timeout_s, reply=("expected", request_id)).result(30)
        return settled

    def cancel(self, request_id, reason) -> None:
        self.conn.send(("cancel", request_id, reason))

    def num_transfers(self) -> int:
        with self._lock:
            self._replies.pop(("count", None), None)
        return self.call("count", reply=("count", None)).result(30)


@pytest.fixture(scope="module")
def tp_decode(tiny_llama_dir):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    dist_init = f"tcp://127.0.0.1:{free_port()}"
    proc = ctx.Process(target=follower_main, args=(str(tiny_llama_dir), dist_init, child), daemon=True)
    proc.start()
    port = PipePort(parent)
    decode = DecodeWorker(
        tiny_llama_dir,
        replace(CONFIG, tensor_parallel_size=2),
        BACKEND,
        transfer_timeout_s=DEADLINE_S,
        dist_init=dist_init,
        kv_secret=TEST_SECRET,
    )
    port.endpoint = port._await(("endpoint", None)).result(120)
    decode.attach_followers([port])
    prefill = PrefillWorker(tiny_llama_dir, CONFIG, BACKEND, transfer_timeout_s=DEADLINE_S, kv_secret=TEST_SECRET)
    yield prefill, decode, port
    prefill.close()
    decode.close()
    port.call("close", reply=("closed", None)).result(60)
    proc.join(60)


def all_settled(decode, port) -> bool:
    """Every block back on rank 0, no part open on rank 1."""
    return all_blocks_free(decode) and port.num_transfers() == 0 and decode.stats().num_transfers == 0


def test_decode_tp2_matches_transformers(tp_decode, tiny_llama_dir):
    prefill, decode, port = tp_decode
    assert decode.engine.kv_cache.layout.num_kv_heads == 1 and prefill.engine.kv_cache.layout.num_kv_heads == 2
    assert_oracle(prefill, decode, tiny_llama_dir, "dtp")
    assert all_blocks_free(prefill) and all_settled(decode, port)


def test_handle_names_every_rank(tp_decode):
    _, decode, port = tp_decode
    handle = decode.reserve(GenerateRequest("names", [5, 6, 7], SamplingParams(max_tokens=2)))
    assert handle.endpoints == (decode.endpoint, port.endpoint)
    decode.abort("names")
    assert all_settled(decode, port)


def test_kv_that_never_arrives_frees_blocks_on_both_ranks(tp_decode):
    _, decode, port = tp_decode
    decode.reserve(GenerateRequest("lost", list(range(5, 40)), SamplingParams(max_tokens=4)))
    assert decode.wait_kv("lost", DEADLINE_S + 10)
    with pytest.raises(TransferFailed, match="did not arrive: rank 0: deadline"):
        decode.admit("lost", 5, lambda d: None)
    assert all_settled(decode, port)


def test_one_rank_failing_fails_the_request_and_frees_it(tp_decode):
    """Rank 1's part is cancelled: the prefill's push fails there, and the request may not run."""
    prefill, decode, port = tp_decode
    params = SamplingParams(temperature=0.0, max_tokens=5)
    prompt = list(range(5, 50))
    handle = decode.reserve(GenerateRequest("half", prompt, params))
    port.cancel("half", "test: rank 1 gives up")
    assert port.num_transfers() == 0  # answered after the cancel: rank 1's part is gone
    result = wait_for(lambda cb: prefill.prefill(GenerateRequest("half", prompt, params), handle, cb))
    assert decode.wait_kv("half", DEADLINE_S + 10)
    with pytest.raises(TransferFailed, match="did not arrive: rank"):
        decode.admit("half", getattr(result, "first_token_id", 0), lambda d: None)
    assert all_blocks_free(prefill) and all_settled(decode, port)


def test_abort_at_each_step_frees_both_ranks(tp_decode):
    prefill, decode, port = tp_decode
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
    assert all_blocks_free(prefill) and all_settled(decode, port)


class RefusingPort:
    """A port whose rank refuses one request's registration (e.g. a clashing id there)."""

    def __init__(self, port, refuse: str):
        self.port, self.refuse, self.endpoint = port, refuse, port.endpoint

    def expect(self, request_id, block_ids, timeout_s):
        if request_id == self.refuse:
            raise RuntimeError(f"rank 1 refuses {request_id}")
        return self.port.expect(request_id, block_ids, timeout_s)

    def cancel(self, request_id, reason):
        self.port.cancel(request_id, reason)


def test_a_rank_refusing_registration_fails_reserve_only(tp_decode, tiny_llama_dir):
    prefill, decode, port = tp_decode
    decode.attach_followers([RefusingPort(port, "refused")])
    try:
        with pytest.raises(TransferFailed, match="could not register refused's blocks on every rank: rank 1 refuses"):
            decode.reserve(GenerateRequest("refused", list(range(5, 40)), SamplingParams(max_tokens=3)))
        assert all_settled(decode, port)
        prompt = list(range(9, 30))  # the worker serves on
        tokens, _ = run_request(prefill, decode, "served", prompt, SamplingParams(temperature=0.0, max_tokens=4))
        assert tokens == hf_greedy(tiny_llama_dir, prompt, 4)
    finally:
        decode.attach_followers([port])
    assert all_blocks_free(prefill) and all_settled(decode, port)

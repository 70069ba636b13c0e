"""Prefill and decode workers end to end over a real KV transport, without Ray.

The oracle holds through the disaggregated path, and no path (success, failed transfer,
abort at any step) leaves a KV block allocated on either worker.
"""

import threading
import time

import pytest

from decode_worker.worker import DecodeState, DecodeWorker, TransferFailed
from engine import EngineConfig, SamplingParams
from engine.engine_loop import RequestAborted
from kv_transfer import TransferState
from prefill_worker.worker import PrefillWorker
from proto.serving import GenerateRequest
from tests.checkpoints import hf_greedy
from tests.kv_transfer.peer import TEST_SECRET

BACKEND = "shm"
# Generous for a loaded 2-core CI machine; the deadline test waits it out once.
DECODE_DEADLINE_S = 5.0


@pytest.fixture(scope="module")
def workers(tiny_llama_dir):
    config = EngineConfig(max_num_batched_tokens=32, num_blocks=64)
    prefill = PrefillWorker(tiny_llama_dir, config, BACKEND, transfer_timeout_s=5.0, kv_secret=TEST_SECRET)
    decode = DecodeWorker(tiny_llama_dir, config, BACKEND, transfer_timeout_s=DECODE_DEADLINE_S, kv_secret=TEST_SECRET)
    yield prefill, decode
    prefill.close()
    decode.close()


def run_request(prefill, decode, rid, prompt, params):
    """The orchestration of one request, as the router does it (minus Ray)."""
    handle = decode.reserve(GenerateRequest(rid, prompt, params))
    result = wait_for(lambda cb: prefill.prefill(GenerateRequest(rid, prompt, params), handle, cb))
    assert not isinstance(result, Exception), result
    assert decode.wait_kv(rid, 5.0)
    deltas = []
    finished = threading.Event()

    def on_delta(d):
        deltas.append(d)
        if d.finished:
            finished.set()

    decode.admit(rid, result.first_token_id, on_delta)
    assert finished.wait(30)
    return [t for d in deltas for t in d.token_ids], deltas[-1]


def assert_oracle(prefill, decode, model_dir, prefix, lengths=(3, 17, 40, 70), max_tokens=10):
    """Greedy requests of these prompt lengths (70 > one 32-token chunk) equal transformers."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for i, n in enumerate(lengths):
        prompt = list(range(7, 7 + n))
        tokens, last = run_request(prefill, decode, f"{prefix}-{i}", prompt, params)
        assert tokens == hf_greedy(model_dir, prompt, max_tokens)
        assert last.finished and last.finish_reason in ("stop", "length")


def wait_for(start):
    box, done = [], threading.Event()
    start(lambda r: (box.append(r), done.set()))
    assert done.wait(30)
    return box[0]


def all_blocks_free(*workers, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(w.stats().num_free_blocks == w.stats().num_blocks for w in workers):
            return True
        time.sleep(0.02)
    return False


def test_disaggregated_greedy_equals_transformers(workers, tiny_llama_dir):
    prefill, decode = workers
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompts = [list(range(5, 5 + n)) for n in (3, 16, 33, 70)]  # 70 > one 32-token chunk
    for i, prompt in enumerate(prompts):
        tokens, last = run_request(prefill, decode, f"ok-{i}", prompt, params)
        assert tokens == hf_greedy(tiny_llama_dir, prompt, 12)
        assert last.finished and last.finish_reason in ("stop", "length")
    assert all_blocks_free(prefill, decode)


def test_concurrent_disaggregated_requests(workers, tiny_llama_dir):
    prefill, decode = workers
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = {f"c-{i}": [7 + i] * (10 + 7 * i) for i in range(5)}
    results = {}
    threads = [
        threading.Thread(target=lambda r=r, p=p: results.__setitem__(r, run_request(prefill, decode, r, p, params)))
        for r, p in prompts.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rid, prompt in prompts.items():
        assert results[rid][0] == hf_greedy(tiny_llama_dir, prompt, 8)
    assert all_blocks_free(prefill, decode)


def test_kv_that_never_arrives_fails_admission_and_frees_blocks(workers):
    _, decode = workers
    decode.reserve(GenerateRequest("lost", list(range(5, 40)), SamplingParams(max_tokens=4)))
    assert decode.transfer_of("lost").wait(DECODE_DEADLINE_S + 5) is TransferState.FAILED  # deadline passed
    with pytest.raises(TransferFailed, match="did not arrive"):
        decode.admit("lost", 5, lambda d: None)
    assert all_blocks_free(decode)


def test_abort_after_reserve_and_during_prefill_frees_both_sides(workers):
    prefill, decode = workers
    params = SamplingParams(temperature=0.0, max_tokens=50)
    handle = decode.reserve(GenerateRequest("ab", list(range(5, 100)), params))
    got = []
    prefill.prefill(GenerateRequest("ab", list(range(5, 100)), params), handle, got.append)
    prefill.abort("ab")
    decode.abort("ab")
    decode.abort("never-existed")
    assert all_blocks_free(prefill, decode)


def test_abort_while_decoding_frees_blocks(workers):
    prefill, decode = workers
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    prompt = list(range(5, 45))
    handle = decode.reserve(GenerateRequest("long", prompt, params))
    result = wait_for(lambda cb: prefill.prefill(GenerateRequest("long", prompt, params), handle, cb))
    assert decode.transfer_of("long").wait(5.0) is TransferState.DONE
    started = threading.Event()
    decode.admit("long", result.first_token_id, lambda d: started.set())
    assert started.wait(5)
    decode.abort("long")
    assert all_blocks_free(prefill, decode)


def test_an_abort_that_overtakes_reserve_frees_the_blocks_at_once(workers):
    """The router gave up while reserve() was on its way: the abort reaches the worker after
    the blocks were granted but before they were registered, or before the request arrived."""
    _, decode = workers
    params = SamplingParams(temperature=0.0, max_tokens=4)
    block_ids = decode.request_blocks(GenerateRequest("overtaken", list(range(5, 40)), params)).result(10)
    decode.abort("overtaken")
    with pytest.raises(RequestAborted):
        decode.register("overtaken", block_ids)
    assert decode.stats().num_transfers == 0  # dropped at once, never left to its deadline
    decode.abort("early")
    with pytest.raises(RequestAborted):
        decode.request_blocks(GenerateRequest("early", list(range(5, 40)), params))
    assert all_blocks_free(decode)


def test_each_worker_keeps_one_record_per_request_until_its_blocks_are_free(workers, tiny_llama_dir):
    prefill, decode = workers
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompt = list(range(5, 60))
    request = GenerateRequest("rec", prompt, params)
    block_ids = decode.request_blocks(request).result(10)
    assert decode._requests["rec"].state is DecodeState.WAITING  # granted, not registered
    handle = decode.register("rec", block_ids)
    assert decode._requests["rec"].state is DecodeState.RECEIVING
    result = wait_for(lambda cb: prefill.prefill(request, handle, cb))
    assert decode.wait_kv("rec", 5.0)
    deltas, finished = [], threading.Event()
    decode.admit("rec", result.first_token_id, lambda d: (deltas.append(d), d.finished and finished.set()))
    assert "rec" not in decode._requests  # the engine owns it now
    assert finished.wait(30)
    assert [t for d in deltas for t in d.token_ids] == hf_greedy(tiny_llama_dir, prompt, 6)
    assert all_blocks_free(prefill, decode)
    assert prefill._requests == {} and decode._requests == {}

    # Aborted while it waits for room: the grant fails and the record goes with it.
    hogs = [decode.request_blocks(GenerateRequest(f"hog{i}", [9] * 400, params)).result(10) for i in range(2)]
    waiting = decode.request_blocks(GenerateRequest("waits", [9] * 300, params))  # 19 blocks; 14 are left
    assert decode._requests["waits"].state is DecodeState.WAITING and not waiting.done()
    decode.abort("waits")
    with pytest.raises(RequestAborted):
        waiting.result(10)
    assert "waits" not in decode._requests
    for i, block_ids in enumerate(hogs):
        decode.register(f"hog{i}", block_ids)
        decode.abort(f"hog{i}")
    assert all_blocks_free(decode) and decode._requests == {}

    # Aborted while queued on the prefill side: the record and the blocks go at once.
    stuck = decode.reserve(GenerateRequest("pq", prompt, params))
    got: list = []
    prefill.prefill(GenerateRequest("pq", prompt, params), stuck, got.append)
    prefill.abort("pq")
    decode.abort("pq")
    assert all_blocks_free(prefill, decode)
    assert prefill._requests == {} and decode._requests == {}

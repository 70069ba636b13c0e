"""A tensor-parallel prefill worker (TP=2, two processes) feeding a TP=1 decode worker.

Each prefill rank sends its own KV heads; the decode worker's receiver assembles them. Rank 1
reports its parts' releases to rank 0 over the ranks' process group only.
The tokens must equal transformers', and every block on every side must come back.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import replace

import pytest

from decode_worker.worker import DecodeWorker
from engine import EngineConfig, SamplingParams
from prefill_worker.worker import PrefillFollower, PrefillWorker
from proto.serving import GenerateRequest
from tests.kv_transfer.peer import TEST_SECRET
from tests.ports import free_port
from tests.workers.test_disaggregated import all_blocks_free, assert_oracle

BACKEND = "shm"
CONFIG = EngineConfig(dtype="float32", max_num_batched_tokens=32, num_blocks=64, max_model_len=256)


def follower_main(model_dir, dist_init, ready: mp.Event) -> None:
    follower = PrefillFollower(
        model_dir,
        replace(CONFIG, tensor_parallel_size=2),
        BACKEND,
        10.0,
        1,
        dist_init,
        kv_secret=TEST_SECRET,
    )
    ready.set()
    follower.close()  # returns once rank 0 closes the group


@pytest.fixture(scope="module")
def tp_prefill(tiny_llama_dir):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    dist_init = f"tcp://127.0.0.1:{free_port()}"
    proc = ctx.Process(target=follower_main, args=(str(tiny_llama_dir), dist_init, ready), daemon=True)
    proc.start()
    prefill = PrefillWorker(
        tiny_llama_dir,
        replace(CONFIG, tensor_parallel_size=2),
        BACKEND,
        10.0,
        dist_init=dist_init,
        kv_secret=TEST_SECRET,
    )
    assert ready.wait(120), "rank 1 did not start"
    decode = DecodeWorker(tiny_llama_dir, CONFIG, BACKEND, transfer_timeout_s=10.0, kv_secret=TEST_SECRET)
    yield prefill, decode
    decode.close()
    prefill.close()
    proc.join(60)


def test_prefill_tp2_to_decode_tp1_matches_transformers(tp_prefill, tiny_llama_dir):
    prefill, decode = tp_prefill
    assert prefill.engine.kv_cache.layout.num_kv_heads == 1 and decode.engine.kv_cache.layout.num_kv_heads == 2
    assert_oracle(prefill, decode, tiny_llama_dir, "tp")
    assert all_blocks_free(prefill, decode)


def test_abort_during_tp_prefill_frees_both_sides(tp_prefill):
    prefill, decode = tp_prefill
    params = SamplingParams(temperature=0.0, max_tokens=20)
    prompt = list(range(5, 120))
    handle = decode.reserve(GenerateRequest("tp-abort", prompt, params))
    prefill.prefill(GenerateRequest("tp-abort", prompt, params), handle, lambda r: None)
    prefill.abort("tp-abort")
    decode.abort("tp-abort")
    assert all_blocks_free(prefill, decode, timeout_s=15)

"""A pipeline stage killed under a disaggregated pair, without Ray (a module of its own: the
test process joins the prefill worker's group of ranks, and may join only one at a time)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import replace

import pytest

from decode_worker.worker import DecodeWorker
from engine import SamplingParams
from prefill_worker.worker import PrefillWorker
from proto.errors import Unavailable
from proto.serving import GenerateRequest
from tests.kv_transfer.peer import TEST_SECRET
from tests.workers.test_disaggregated import all_blocks_free
from tests.workers.test_pipeline_transfer import BACKEND, CONFIG, start_followers


def test_a_killed_prefill_stage_fails_its_request_and_frees_the_decode_blocks(tiny_llama_dir):
    """Stage 1 of a pp=2 prefill worker dies (SIGKILL) after the decode worker reserved a
    request's blocks and before its prefill runs: the prefill worker fails the request and
    reports unhealthy (it is replaced, its cache with it), the decode side frees the blocks it
    reserved, and the prefill worker's rank 0 every block of its own."""
    pconf = replace(CONFIG, pipeline_parallel_size=2)
    ctx = mp.get_context("spawn")
    p_init, p_procs = start_followers(ctx, "prefill", tiny_llama_dir, pconf)
    prefill = PrefillWorker(tiny_llama_dir, pconf, BACKEND, 10.0, dist_init=p_init, kv_secret=TEST_SECRET)
    decode = DecodeWorker(tiny_llama_dir, CONFIG, BACKEND, transfer_timeout_s=30.0, kv_secret=TEST_SECRET)
    try:
        ((stage1, ready),) = p_procs
        assert ready.wait(120), "stage 1 did not start"
        params = SamplingParams(temperature=0.0, max_tokens=8)
        prompt = list(range(5, 200))
        handle = decode.reserve(GenerateRequest("killed", prompt, params))
        results, done = [], threading.Event()
        os.kill(stage1.pid, signal.SIGKILL)
        stage1.join(30)
        try:  # refused at once if the loop saw the stage go first, else failed through the callback
            prefill.prefill(
                GenerateRequest("killed", prompt, params), handle, lambda r: (results.append(r), done.set())
            )
        except Unavailable as e:
            results.append(e)
            done.set()
        assert done.wait(60), "the prefill never ended"
        assert isinstance(results[0], Exception), results[0]
        assert not prefill.loop.healthy
        with pytest.raises(Unavailable, match="engine loop is not running"):
            prefill.stats()  # health tells the truth
        decode.abort("killed")  # what the router does with a request whose prefill failed
        assert all_blocks_free(decode, timeout_s=40)
        # Nor does the prefill worker keep any: rank 0's part of a transfer that started with the
        # failed step is cancelled, the dead stage's part counts as let go, and the loop, stopped,
        # still frees what the transfers give back.
        bm = prefill.engine.block_manager
        deadline = time.monotonic() + 30
        while bm.num_free_blocks != bm.num_blocks:
            assert time.monotonic() < deadline, f"{bm.num_blocks - bm.num_free_blocks} blocks held on rank 0"
            time.sleep(0.05)
    finally:
        decode.close()
        prefill.close()

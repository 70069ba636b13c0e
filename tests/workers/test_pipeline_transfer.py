"""Pipeline stages on either side of a disaggregated pair, without Ray: each follower rank in
its own process, shm KV transfers, the tiny 2-layer Llama (a stage per layer).

Each prefill stage sends the KV of its layers to the decode rank(s) that hold them; the
tokens must equal transformers', and every block on every side must come back, whether a
request finishes or is aborted mid-prefill.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import replace

import pytest

from decode_worker.follower import DecodeFollower
from decode_worker.worker import DecodeWorker
from engine import EngineConfig, SamplingParams
from prefill_worker.worker import PrefillFollower, PrefillWorker
from proto.serving import GenerateRequest
from tests.kv_transfer.peer import TEST_SECRET
from tests.ports import free_port
from tests.workers.test_disaggregated import all_blocks_free, assert_oracle

BACKEND = "shm"
CONFIG = EngineConfig(dtype="float32", max_num_batched_tokens=32, num_blocks=64, max_model_len=256)
# (prefill tp, pp), (decode tp, pp). One process joins one group of ranks: only one side's rank 0
# (in this test process) may have followers.
LAYOUTS = {
    "pp2-to-pp1": ((1, 2), (1, 1)),
    "pp1-to-pp2": ((1, 1), (1, 2)),
    "pp2xtp2-to-pp1": ((2, 2), (1, 1)),
}


def follower_main(role: str, model_dir: str, config: EngineConfig, rank: int, dist_init: str, ready) -> None:
    if role == "prefill":
        follower = PrefillFollower(model_dir, config, BACKEND, 10.0, rank, dist_init, kv_secret=TEST_SECRET)
    else:
        follower = DecodeFollower(model_dir, config, BACKEND, "127.0.0.1", rank, dist_init, kv_secret=TEST_SECRET)
    ready.set()
    follower.close()  # returns once rank 0 closes the group


def start_followers(ctx, role: str, model_dir, config: EngineConfig) -> tuple[str | None, list]:
    if config.num_ranks == 1:
        return None, []
    dist_init = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    for rank in range(1, config.num_ranks):
        ready = ctx.Event()
        proc = ctx.Process(
            target=follower_main, args=(role, str(model_dir), config, rank, dist_init, ready), daemon=True
        )
        proc.start()
        procs.append((proc, ready))
    return dist_init, procs


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def pair(request, tiny_llama_dir):
    (ptp, ppp), (dtp, dpp) = LAYOUTS[request.param]
    pconf = replace(CONFIG, tensor_parallel_size=ptp, pipeline_parallel_size=ppp)
    dconf = replace(CONFIG, tensor_parallel_size=dtp, pipeline_parallel_size=dpp)
    ctx = mp.get_context("spawn")
    p_init, p_procs = start_followers(ctx, "prefill", tiny_llama_dir, pconf)
    d_init, d_procs = start_followers(ctx, "decode", tiny_llama_dir, dconf)
    prefill = PrefillWorker(tiny_llama_dir, pconf, BACKEND, 10.0, dist_init=p_init, kv_secret=TEST_SECRET)
    decode = DecodeWorker(
        tiny_llama_dir, dconf, BACKEND, transfer_timeout_s=10.0, dist_init=d_init, kv_secret=TEST_SECRET
    )
    for _proc, ready in p_procs + d_procs:
        assert ready.wait(120), "a follower rank did not start"
    yield request.param, prefill, decode
    decode.close()
    prefill.close()
    for proc, _ in p_procs + d_procs:
        proc.join(60)


def test_stages_match_transformers_and_free_every_block(pair, tiny_llama_dir):
    name, prefill, decode = pair
    (_, ppp), (_, dpp) = LAYOUTS[name]
    assert prefill.engine.kv_cache.layout.pp_size == ppp and decode.engine.kv_cache.layout.pp_size == dpp
    assert len(decode.endpoints) == decode.engine.num_ranks
    assert_oracle(prefill, decode, tiny_llama_dir, name)
    assert all_blocks_free(prefill, decode)


def test_abort_during_a_staged_prefill_frees_both_sides(pair):
    name, prefill, decode = pair
    params = SamplingParams(temperature=0.0, max_tokens=20)
    prompt = list(range(5, 120))
    rid = f"{name}-abort"
    handle = decode.reserve(GenerateRequest(rid, prompt, params))
    prefill.prefill(GenerateRequest(rid, prompt, params), handle, lambda r: None)
    prefill.abort(rid)
    decode.abort(rid)
    assert all_blocks_free(prefill, decode, timeout_s=15)

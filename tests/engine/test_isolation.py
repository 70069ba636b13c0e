"""One request's failure is its own; a step that breaks stops the engine loudly; admission queues."""

import threading
import time

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.engine_loop import EngineLoop, Overloaded, RequestAborted, Unavailable
from tests.checkpoints import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = {"a": list(range(5, 20)), "b": list(range(7, 30)), "c": list(range(9, 14))}


def run_all(engine: LLMEngine) -> dict:
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def assert_all_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.requests and not engine.scheduler.held


def test_a_request_whose_sampling_fails_ends_alone_and_the_batch_goes_on(tiny_llama_dir, monkeypatch):
    engine = LLMEngine(tiny_llama_dir, EngineConfig(max_num_batched_tokens=64))
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, SamplingParams(temperature=0.7, seed=1, max_tokens=8) if rid == "b" else GREEDY)
    real = engine.sampler._sample_row
    calls = {"n": 0}

    def flaky(logits, request_id, p):  # b's third token cannot be sampled
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("probability tensor contains inf")
        return real(logits, request_id, p)

    monkeypatch.setattr(engine.sampler, "_sample_row", flaky)
    outputs = run_all(engine)
    last_b = outputs["b"][-1]
    assert last_b.finished and last_b.finish_reason == "error" and "probability tensor" in last_b.error
    assert len(last_b.token_ids) == 2
    for rid in ("a", "c"):
        assert outputs[rid][-1].finish_reason == "length" and outputs[rid][-1].error is None
        assert outputs[rid][-1].token_ids == hf_greedy(tiny_llama_dir, PROMPTS[rid], 8)
    assert_all_free(engine)


def test_a_request_whose_text_fails_ends_alone(tiny_llama_dir, monkeypatch):
    engine = LLMEngine(tiny_llama_dir, EngineConfig(max_num_batched_tokens=64))
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, GREEDY)
    detok = engine.requests["a"].detokenizer
    monkeypatch.setattr(detok, "append", lambda token_id: 1 / 0)
    outputs = run_all(engine)
    assert outputs["a"][-1].finish_reason == "error" and "ZeroDivisionError" in outputs["a"][-1].error
    assert outputs["a"][-1].new_text == ""
    for rid in ("b", "c"):
        assert outputs[rid][-1].token_ids == hf_greedy(tiny_llama_dir, PROMPTS[rid], 8)
    assert_all_free(engine)


class Deltas:
    """Collects a request's deltas from the loop thread."""

    def __init__(self):
        self.items = []
        self.done = threading.Event()

    def __call__(self, delta):
        self.items.append(delta)
        if delta.finished:
            self.done.set()


def test_a_step_that_breaks_fails_everything_retryably_and_says_so_at_once(tiny_llama_dir, monkeypatch):
    engine = LLMEngine(tiny_llama_dir, EngineConfig(max_num_batched_tokens=64))
    loop = EngineLoop(engine)
    try:
        started = threading.Event()
        real = engine.runner.execute

        def breaking(*args, **kwargs):
            if started.is_set():
                raise RuntimeError("device lost")
            started.set()
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.runner, "execute", breaking)
        streams = {rid: Deltas() for rid in PROMPTS}
        for rid, prompt in PROMPTS.items():
            loop.submit(rid, prompt, GREEDY, streams[rid])
        for stream in streams.values():
            assert stream.done.wait(10)
            last = stream.items[-1]
            assert last.finish_reason == "error" and last.retryable and "device lost" in last.error
        assert not loop.healthy
        with pytest.raises(Unavailable, match="device lost"):
            loop.submit("later", [5, 6], GREEDY, Deltas())
    finally:
        loop.close()


def test_an_abort_that_overtakes_its_request_refuses_it(tiny_llama_dir):
    loop = EngineLoop(LLMEngine(tiny_llama_dir, EngineConfig(max_num_batched_tokens=64)))
    try:
        loop.abort("early")
        with pytest.raises(RequestAborted):
            loop.submit("early", [5, 6, 7], GREEDY, Deltas())
        loop.abort("early-reserve")
        with pytest.raises(RequestAborted):
            loop.reserve("early-reserve", [5, 6, 7], GREEDY)
        bm = loop.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not loop.engine.requests
    finally:
        loop.close()


def test_reservations_queue_for_room_in_order_and_overload_only_past_max_waiting(tiny_llama_dir):
    engine = LLMEngine(tiny_llama_dir, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64))
    loop = EngineLoop(engine, max_waiting=2)
    try:
        prompt = list(range(5, 40))
        first, second = loop.reserve("r1", prompt, GREEDY), loop.reserve("r2", prompt, GREEDY)
        assert first.result(5) and second.result(5)  # two batch slots
        third, fourth = loop.reserve("r3", prompt, GREEDY), loop.reserve("r4", prompt, GREEDY)
        time.sleep(0.2)
        assert not third.done() and not fourth.done()  # waiting for a slot, not refused
        assert loop.stats().num_waiting == 2
        with pytest.raises(Overloaded, match="max_waiting=2"):
            loop.reserve("r5", prompt, GREEDY)
        loop.abort("r4")  # a queued reservation leaves the queue
        with pytest.raises(RequestAborted):
            fourth.result(5)
        loop.abort("r1")
        engine_blocks = third.result(5)  # r1's slot (its blocks wait for release: held)
        assert engine_blocks
        loop.release_soon("r1")
        for rid in ("r2", "r3"):
            loop.abort(rid)
            loop.release_soon(rid)
        deadline = time.monotonic() + 5
        while engine.block_manager.num_free_blocks != engine.block_manager.num_blocks:
            assert time.monotonic() < deadline, loop.stats()
            time.sleep(0.02)
    finally:
        loop.close()

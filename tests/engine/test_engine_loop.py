"""EngineLoop's decode-side queue: reservations wait for a batch slot and get one as slots free."""

import itertools
import threading
import time

from engine import EngineConfig, SamplingParams
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine


def test_a_request_done_at_its_first_token_hands_its_slot_to_the_next_reservation(tiny_llama_dir):
    """admit() can finish a request without a step (max_tokens 1): the reservation waiting for
    its batch slot must get it then, not when some later request happens to arrive."""
    loop = EngineLoop(LLMEngine(tiny_llama_dir, EngineConfig(max_num_seqs=1, num_blocks=32)))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1)
        first = loop.reserve("a", [5, 6, 7], params)
        first.result(10)
        second = loop.reserve("b", [8, 9], params)
        assert not second.done()  # the one batch slot is a's
        finished = threading.Event()
        loop.admit("a", 11, lambda d: d.finished and finished.set())
        assert finished.wait(10)
        assert second.result(10)  # b's blocks, with nothing else happening
    finally:
        loop.close()


def test_each_step_is_recorded_with_what_it_computed(tiny_llama_dir):
    """take_steps() gives every step the loop ran since the last call, shaped as the planner's
    latency model counts a step: a prompt's tokens and attention pairs, then one decode per
    step attending to the prompt and the tokens after it."""
    loop = EngineLoop(LLMEngine(tiny_llama_dir, EngineConfig(num_blocks=32)))
    try:
        done = threading.Event()
        loop.submit("a", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                    lambda d: d.finished and done.set())  # fmt: skip
        assert done.wait(30)
        deadline = time.monotonic() + 10  # the last step's record follows its outputs' delivery
        while len(loop._steps) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        steps = loop.take_steps()
        shapes = [(s.prefill_tokens, s.attn_tokens2, s.num_decodes, s.context_tokens) for s in steps]
        assert shapes == [(4, 16, 0, 0), (0, 0, 1, 5), (0, 0, 1, 6), (0, 0, 1, 7)]
        assert all(s.ms > 0 for s in steps)
        # Started in turn, each after the one before it had taken its time.
        assert all(b.at_s >= a.at_s + a.ms / 1e3 - 1e-6 for a, b in itertools.pairwise(steps))
        assert loop.take_steps() == []  # taken once
    finally:
        loop.close()

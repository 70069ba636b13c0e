"""EngineLoop's decode-side queue: reservations wait for a batch slot and get one as slots free."""

import threading

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

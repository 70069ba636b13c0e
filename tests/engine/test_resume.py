"""A request resumed on another engine after the tokens its lost worker had streamed: it goes on
as if nothing happened (router/orchestrator.py runs it so when a worker dies)."""

import pytest

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from proto.serving import Resume
from tests.checkpoints import hf_greedy


def run(engine, request_id, prompt, params, resume=None):
    """Every new token and text piece the engine streams for one request, and its last output."""
    engine.add_request(request_id, prompt, params, resume=resume)
    tokens, text, last = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            text.append(out.new_text)
            last = out
    return tokens, "".join(text), last


@pytest.mark.parametrize("cut", [1, 7, 19])
def test_a_greedy_request_resumed_elsewhere_equals_transformers_with_no_gap_or_repeat(checkpoints, cut):
    model = checkpoints["llama"]
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    whole_tokens, whole_text, _ = run(LLMEngine(model, EngineConfig()), "whole", prompt, params)
    assert whole_tokens == hf_greedy(model, prompt, 24, ignore_eos=True)

    # The lost worker had streamed `cut` tokens and their text; a fresh engine goes on.
    first = LLMEngine(model, EngineConfig(max_num_batched_tokens=16))
    first.add_request("r", prompt, params)
    streamed_tokens, streamed_text = [], []
    while len(streamed_tokens) < cut:
        for out in first.step():
            streamed_tokens += out.new_token_ids
            streamed_text.append(out.new_text)
    resume = Resume(tuple(streamed_tokens), "".join(streamed_text))
    tokens, text, last = run(LLMEngine(model, EngineConfig()), "r", prompt, params, resume)
    assert streamed_tokens + tokens == whole_tokens
    assert "".join(streamed_text) + text == whole_text
    assert last.finish_reason == "length" and last.token_ids == whole_tokens
    assert len(last.prompt_token_ids) == len(prompt)  # usage counts the prompt, not the resumed tokens


def test_a_stop_string_across_the_cut_still_stops_it(checkpoints):
    model = checkpoints["llama"]
    prompt = "Once upon a time, there was"
    free = run(LLMEngine(model, EngineConfig()), "free", prompt, SamplingParams(temperature=0.0, max_tokens=30))
    text = free[1]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(temperature=0.0, max_tokens=30, stop=[stop])
    whole_tokens, whole_text, whole_last = run(LLMEngine(model, EngineConfig()), "w", prompt, params)
    assert whole_last.finish_reason == "stop"
    # Lost after the token where the stop string starts: its text was held back, not streamed.
    engine = LLMEngine(model, EngineConfig())
    engine.add_request("r", prompt, params)
    streamed_tokens, streamed_text = [], []
    while engine.has_unfinished() and (not streamed_tokens or len("".join(streamed_text)) < text.find(stop) - 3):
        for out in engine.step():
            streamed_tokens += out.new_token_ids
            streamed_text.append(out.new_text)
    assert engine.has_unfinished(), "the cut must come before the stop string ends the request"
    resumed = run(
        LLMEngine(model, EngineConfig()), "r", prompt, params, Resume(tuple(streamed_tokens), "".join(streamed_text))
    )
    assert streamed_tokens + resumed[0] == whole_tokens
    assert "".join(streamed_text) + resumed[1] == whole_text and resumed[2].finish_reason == "stop"


def test_seeded_sampling_goes_on_with_the_same_tokens(checkpoints):
    model = checkpoints["qwen2"]
    prompt = list(range(2, 30))
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    whole = run(LLMEngine(model, EngineConfig()), "s", prompt, params)[0]
    assert (
        whole
        != run(
            LLMEngine(model, EngineConfig()),
            "s",
            prompt,
            SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True),
        )[0]
    )
    resumed = run(LLMEngine(model, EngineConfig()), "s", prompt, params, Resume(tuple(whole[:8]), ""))[0]
    assert whole[:8] + resumed == whole


def test_a_resume_that_cannot_go_on_is_refused_by_field(checkpoints):
    engine = LLMEngine(checkpoints["llama"], EngineConfig())
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match="resume.token_ids holds 4 tokens, max_tokens is 4"):
        engine.add_request("a", [5, 6], params, resume=Resume((7, 8, 9, 10), ""))
    with pytest.raises(ValueError, match=r"resume.token_ids \[99999\] are outside the vocabulary"):
        engine.add_request("b", [5, 6], params, resume=Resume((99999,), ""))
    with pytest.raises(ValueError, match="resume.text is not the text of resume.token_ids"):
        engine.add_request("c", [5, 6], params, resume=Resume((7,), "certainly not this"))
    with pytest.raises(ValueError, match="prefilled where it decodes"):
        engine.add_request("d", [5, 6], params, hold_blocks=True, resume=Resume((7,), ""))
    assert not engine.requests and not engine.has_unfinished()  # nothing half-added

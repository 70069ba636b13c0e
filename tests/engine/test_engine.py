"""The step loop: streaming deltas, stop strings, abort."""

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig


def test_stop_string_truncates_text_and_finishes(checkpoints):
    llm = LLM(checkpoints["llama"])
    free_run = llm.generate("Once upon", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    text = free_run.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    out = llm.generate("Once upon", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]
    assert out.token_ids == free_run.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(free_run.token_ids)


def test_streaming_deltas_add_up_to_the_output(checkpoints):
    engine = LLMEngine(checkpoints["qwen2"], EngineConfig(max_num_batched_tokens=16))
    engine.add_request("r", list(range(2, 40)), SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    deltas, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas += out.new_token_ids
            last = out
    assert last.finished and deltas == last.token_ids and len(deltas) == 7
    assert last.metrics["first_token_s"] >= last.metrics["arrival_s"]


def test_abort_mid_generation_frees_every_block(checkpoints):
    engine = LLMEngine(checkpoints["mistral"], EngineConfig(max_num_batched_tokens=16))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("keep", list(range(2, 30)), params)
    engine.add_request("drop", list(range(2, 50)), params)
    engine.add_request("queued", list(range(2, 10)), params)
    for _ in range(4):
        engine.step()
    engine.abort("drop")
    engine.abort("queued")
    engine.abort("unknown-id")  # ignored
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["keep"]
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_streamed_text_deltas_add_up_to_the_final_text(checkpoints):
    engine = LLMEngine(checkpoints["llama"], EngineConfig())
    prompt = "Once upon a time, there was"
    stop = "the"
    engine.add_request("plain", prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    engine.add_request("stop", prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))
    pieces = {"plain": [], "stop": []}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            pieces[out.request_id].append(out.new_text)
            if out.finished:
                final[out.request_id] = out
    tokenizer = engine.tokenizer
    plain = final["plain"]
    assert "".join(pieces["plain"]) == plain.text == tokenizer.decode(plain.token_ids, skip_special_tokens=True)
    streamed_stop = "".join(pieces["stop"])
    assert streamed_stop == final["stop"].text and stop not in streamed_stop
    if stop in plain.text:
        assert final["stop"].finish_reason == "stop" and streamed_stop == plain.text[: plain.text.find(stop)]

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus

BS = 4


def make(num_blocks=16, **cfg):
    config = SchedulerConfig(
        **{"max_num_seqs": 4, "max_num_batched_tokens": 8, "max_model_len": 64, "eos_token_id": 1, **cfg}
    )
    return Scheduler(config, BlockManager(num_blocks, BS))


def add(sched, rid, n, max_tokens=8, **params):
    s = Sequence(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens, **params))
    sched.add(s)
    return s


def run_step(sched, token=5):
    out = sched.schedule()
    sampled = {s.seq.request_id: token for s in out.scheduled if s.samples}
    return out, sched.update(out, sampled)


def test_chunked_prefill_respects_the_token_budget():
    sched = make()
    s = add(sched, "a", 19)
    budgets = []
    while s.num_output_tokens == 0:
        out, _ = run_step(sched)
        budgets.append(out.num_batched_tokens)
    assert budgets == [8, 8, 3] and s.num_computed_tokens == 19


def test_decodes_come_first_and_prefills_fill_the_rest():
    sched = make()
    a = add(sched, "a", 3)
    run_step(sched)  # a prefilled, now decoding
    add(sched, "b", 20)
    out, _ = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    assert a.num_output_tokens == 2


def test_max_num_seqs_caps_the_running_batch():
    sched = make(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(4):
        add(sched, f"r{i}", 3)
    out, _ = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_preemption_frees_blocks_and_recomputes_later():
    # 4 blocks of 4 slots: two 7-token sequences fit, but not once both grow past 8.
    sched = make(num_blocks=4, max_num_batched_tokens=16, max_model_len=16)
    a = add(sched, "a", 7)
    b = add(sched, "b", 7)
    run_step(sched)
    run_step(sched)  # both at 8 tokens with 2 blocks each
    out, _ = run_step(sched)  # a needs a third block: b (newest) is preempted
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING
    assert b.block_ids == [] and b.num_computed_tokens == 0 and b.num_output_tokens == 2
    assert sched.waiting[0] is b
    while sched.num_unfinished:
        run_step(sched)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert sched.block_manager.num_free_blocks == 4


def test_newest_sequence_preempts_itself_when_it_needs_a_block():
    sched = make(num_blocks=4, max_num_batched_tokens=16, max_model_len=16)
    a = add(sched, "a", 5)
    b = add(sched, "b", 8)
    run_step(sched)  # a: 6 tokens in 2 blocks; b: 9 tokens, its 9th needs a third block
    out, _ = run_step(sched)
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a]
    assert b.block_ids == [] and sched.block_manager.num_free_blocks == 2
    while sched.num_unfinished:
        run_step(sched)
    assert sched.block_manager.num_free_blocks == 4


def test_cache_smaller_than_the_context_window_is_refused():
    with pytest.raises(ValueError, match="fewer than max_model_len=64"):
        make(num_blocks=2)


def test_prompt_longer_than_context_window_is_rejected():
    sched = make(max_model_len=16)
    with pytest.raises(ValueError, match="context window allows at most 15"):
        add(sched, "a", 16)


def test_stop_conditions():
    sched = make()
    eos = add(sched, "eos", 3)
    ignore = add(sched, "ignore", 3, ignore_eos=True, max_tokens=3)
    stop_id = add(sched, "stop-id", 3, stop_token_ids=[1])
    finished = []
    while sched.num_unfinished:
        finished += run_step(sched, token=1)[1]
    assert eos.finish_reason is FinishReason.STOP and eos.output_token_ids == [1]
    assert stop_id.finish_reason is FinishReason.STOP
    assert ignore.finish_reason is FinishReason.LENGTH and ignore.output_token_ids == [1, 1, 1]
    assert set(finished) == {eos, ignore, stop_id}


def test_abort_frees_blocks_of_running_and_waiting():
    sched = make(max_num_seqs=1)
    a = add(sched, "a", 6)
    b = add(sched, "b", 6)
    run_step(sched)
    sched.finish(a, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)
    assert sched.num_unfinished == 0 and sched.block_manager.num_free_blocks == 16

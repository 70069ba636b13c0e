"""delta_stream: the bridge from the engine thread to a caller's event loop, and the joined
deltas a slow caller gets."""

import asyncio

import pytest

from engine.engine_loop import delta_stream
from proto.serving import FinishReason, TokenDelta, final_delta


def _delta(tokens: tuple[int, ...], text: str, finished: bool = False) -> TokenDelta:
    return TokenDelta("r", tokens, text, finished, FinishReason.LENGTH if finished else None, 5, 2)


def test_joined_deltas_keep_order_and_take_the_last_ones_end():
    joined = _delta((1,), "a").then(_delta((2, 3), "bc")).then(_delta((4,), "d", finished=True))
    assert (joined.token_ids, joined.text, joined.finished, joined.finish_reason) == (
        (1, 2, 3, 4),
        "abcd",
        True,
        "length",
    )
    assert (joined.num_prompt_tokens, joined.num_cached_tokens) == (5, 2)
    aborted = _delta((1,), "a").then(final_delta("r", FinishReason.ABORT))
    assert (aborted.token_ids, aborted.finish_reason, aborted.num_prompt_tokens) == ((1,), "abort", 5)


def test_deltas_of_two_requests_are_not_joined():
    with pytest.raises(ValueError, match="r and other"):
        _delta((1,), "a").then(TokenDelta("other", (2,), "b", False, None, 5, 0))


def test_a_caller_that_falls_behind_gets_the_backlog_joined_and_a_prompt_one_gets_each_step():
    async def run() -> tuple[list[TokenDelta], list[TokenDelta]]:
        async def burst(on_delta):  # three steps before the caller looks: one item
            for i in range(3):
                on_delta(_delta((i,), str(i), finished=i == 2))

        async def stop():
            raise AssertionError("a finished stream is not aborted")

        backlog = [d async for d in delta_stream(burst, stop)]
        taken = asyncio.Queue()  # the caller took one more item: the next step may come

        async def paced(on_delta):
            async def steps():
                for i in range(3):
                    on_delta(_delta((i,), str(i), finished=i == 2))
                    await taken.get()

            tasks.append(asyncio.create_task(steps()))

        tasks: list[asyncio.Task] = []
        prompt = []
        async for d in delta_stream(paced, stop):
            prompt.append(d)
            taken.put_nowait(None)
        return backlog, prompt

    backlog, prompt = asyncio.run(run())
    assert [(d.token_ids, d.text, d.finished) for d in backlog] == [((0, 1, 2), "012", True)]
    assert [d.token_ids for d in prompt] == [(0,), (1,), (2,)]

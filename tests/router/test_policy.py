"""The routing policy: which worker of each role a request goes to."""

import pytest

from proto.errors import Unavailable
from proto.serving import WorkerStats
from router.policy import RoutingPolicy


def stats(running=0, free=100, total=100, waiting=0):
    return WorkerStats(waiting, running, 0, 0, 0, free, total, 0)


def test_a_burst_between_two_stats_calls_is_spread_over_the_decode_workers():
    policy = RoutingPolicy("load", 1, 3, block_size=16)
    for view in policy.decode:
        view.update(stats())
    picks = [policy.pick_decode([]).index for _ in range(12)]
    assert sorted(picks.count(i) for i in range(3)) == [4, 4, 4]
    for view in policy.decode:  # the next stats call counts them itself
        view.update(stats(running=4))
    assert [v.routed for v in policy.decode] == [0, 0, 0]


def test_kv_room_comes_first_then_load_then_the_cached_prefix():
    policy = RoutingPolicy("load", 1, 3, block_size=16)
    policy.decode[0].update(stats(running=1, free=20))  # little KV room left
    policy.decode[1].update(stats(running=5, free=90))
    policy.decode[2].update(stats(running=2, free=88))
    assert policy.pick_decode([]).index == 2  # room alike (to a tenth): fewer requests
    hashes = policy.hashes(list(range(64)))
    policy.decode[1].remember(hashes)
    policy.decode[2].update(stats(running=5, free=88))
    assert policy.pick_decode(hashes).index == 1  # same room, same load: the cached prefix


def test_prefill_weighs_the_requests_routed_since_the_last_stats():
    policy = RoutingPolicy("load", 2, 1, block_size=16)
    for view in policy.prefill:
        view.update(stats())
    hashes = policy.hashes(list(range(64)))
    assert [policy.pick_prefill(hashes).index for _ in range(4)] == [0, 1, 0, 1]


def test_dead_workers_are_skipped_and_none_up_is_unavailable():
    policy = RoutingPolicy("load", 1, 2, block_size=16)
    policy.decode[0].update(None)
    policy.decode[1].update(stats())
    assert {policy.pick_decode([]).index for _ in range(5)} == {1}
    policy.decode[1].update(None)
    with pytest.raises(Unavailable, match="no decode worker is up"):
        policy.pick_decode([])


def test_a_worker_is_down_after_two_stats_calls_in_a_row_get_no_answer_in_time():
    policy = RoutingPolicy("load", 1, 1, block_size=16)
    view = policy.decode[0]
    view.update(stats())
    view.timed_out()  # busy on a loaded machine: still up, on its last stats
    assert view.alive and view.stats is not None
    view.update(stats(running=3))
    view.timed_out()
    assert view.alive  # the answer in between started the count again
    view.timed_out()
    assert not view.alive and view.stats is None


def test_a_worker_a_request_found_gone_stays_down_until_a_later_stats_call_answers():
    policy = RoutingPolicy("load", 1, 1, block_size=16)
    view = policy.decode[0]
    view.lost(now=10.0)
    view.update(stats(), asked_at=9.5)  # asked before it was lost: stale
    assert not view.alive
    view.update(stats(), asked_at=10.5)
    assert view.alive


def test_a_decode_worker_short_of_kv_sheds_its_largest_fitting_request_to_the_roomiest():
    from router.policy import Running, pick_shed

    policy = RoutingPolicy("load", 0, 3, block_size=16)
    policy.decode[0].update(stats(free=5))  # 95% used: pressed
    policy.decode[1].update(stats(free=50))  # 50%: room for 10 blocks before 60%
    policy.decode[2].update(stats(free=70))  # 30%: room for 30 blocks
    running = [Running("a", 0, 100), Running("b", 0, 470), Running("big", 0, 600), Running("c", 1, 900)]
    chosen, dst = pick_shed(policy.decode, running, 16)
    assert (chosen.run_id, dst) == ("b", 2)  # "big" needs 38 blocks: more than any room
    policy.decode[2].draining = True  # a draining worker takes nothing
    chosen, dst = pick_shed(policy.decode, running, 16)
    assert (chosen.run_id, dst) == ("a", 1)


def test_no_worker_sheds_below_the_high_mark_and_none_takes_above_the_low_one():
    from router.policy import Running, pick_shed

    policy = RoutingPolicy("load", 0, 2, block_size=16)
    running = [Running("a", 0, 40)]
    policy.decode[0].update(stats(free=15))  # 85%: not pressed
    policy.decode[1].update(stats(free=90))
    assert pick_shed(policy.decode, running, 16) is None
    policy.decode[0].update(stats(free=5))  # 95%: pressed, but the other is 45% full
    policy.decode[1].update(stats(free=55))
    assert pick_shed(policy.decode, running, 16) is not None
    policy.decode[1].update(stats(free=35))  # 65%: no room under the low mark
    assert pick_shed(policy.decode, running, 16) is None
    # Hysteresis: what a move puts on its destination keeps it under the low mark, so far
    # below the high one at which it would shed the request back.


def test_a_preempting_decode_worker_sheds_even_below_the_high_mark():
    from router.policy import Running, pick_shed

    policy = RoutingPolicy("load", 0, 2, block_size=16)
    policy.decode[0].update(WorkerStats(0, 3, 0, 0, 0, 30, 100, 2))
    policy.decode[1].update(stats(free=100))
    running = [Running("a", 0, 40)]
    assert pick_shed(policy.decode, running, 16) is None  # 70% used, no preemption seen yet
    policy.decode[0].update(WorkerStats(1, 2, 0, 0, 0, 30, 100, 3))  # one more preemption
    assert policy.decode[0].preempting
    assert pick_shed(policy.decode, running, 16) == (running[0], 1)

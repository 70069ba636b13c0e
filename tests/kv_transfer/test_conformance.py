"""The conformance suite every backend passes: real sender and receiver processes.

Each test runs once per backend and device (conftest.env). The sender is a child process,
the receiver the test process, unless the test kills or mismatches the receiver.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from kv_transfer import HandshakeError
from tests.kv_transfer.peer import Peer, PeerError, as_bytes, content, make_layout, shard

TIMEOUT_S = 30.0  # deadline of transfers that must not expire


def expected_cache(layout, transfers, seed: int) -> np.ndarray:
    """The receiver's cache after `transfers` [(src_block_ids, dst_block_ids)] from `seed`."""
    src = shard(content(layout, seed), layout)
    dst = src.new_zeros(src.shape)
    for src_ids, dst_ids in transfers:
        dst[:, :, list(dst_ids)] = src[:, :, list(src_ids)]
    return as_bytes(dst)


def setup_pair(env, ends, seed: int, **layout_fields):
    """A sender in a child process and a receiver here; returns their names and the endpoint."""
    rx, endpoint = ends.receiver(env.local, env.layout(receiver=True, **layout_fields))
    tx = ends.sender(env.peers[0], env.layout(receiver=False, **layout_fields), seed)
    return tx, rx, endpoint


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_byte_exact_for_random_block_maps(env, ends, dtype):
    seed = 11
    tx, rx, endpoint = setup_pair(env, ends, seed, dtype=dtype)
    layout = env.layout(receiver=True, dtype=dtype)
    rng = np.random.default_rng(seed)
    maps = [
        (rng.choice(24, 7, replace=False).tolist(), rng.choice(12, 7, replace=False).tolist()),
        (list(range(3, 9)), list(range(14, 20))),
    ]  # contiguous runs: the coalesced path
    for src_ids, dst_ids in maps:
        tid = env.new_id("exact")
        env.local.call("expect", rx, tid, dst_ids, TIMEOUT_S)
        env.peers[0].call("start", tx, tid, src_ids, [endpoint], TIMEOUT_S)
        env.peers[0].call("push", tx, tid, list(range(layout.num_layers)))
        received = env.local.call("wait", tid, TIMEOUT_S)
        sent = env.peers[0].call("wait_released", tid, TIMEOUT_S)
        assert (received["state"], sent["state"]) == ("done", "done"), (received, sent)
        assert sent["released"] and sent["release_log"]["block_ids"] == tuple(src_ids)
        assert not received["released"]  # a DONE transfer's blocks belong to the request
    assert np.array_equal(env.local.call("cache", rx), expected_cache(layout, maps, seed))


def test_layers_land_one_by_one_in_push_order(env, ends):
    seed = 12
    tx, rx, endpoint = setup_pair(env, ends, seed)
    layout = env.layout(receiver=True)
    src_ids, dst_ids = [5, 0, 17, 9], [2, 11, 7, 20]
    want = shard(content(layout, seed), layout)[:, :, src_ids]
    tid = env.new_id("order")
    env.local.call("expect", rx, tid, dst_ids, TIMEOUT_S)
    env.peers[0].call("start", tx, tid, src_ids, [endpoint], TIMEOUT_S)
    push_order = [2, 0, 3, 1]
    for i, layer in enumerate(push_order):
        env.peers[0].call("push", tx, tid, [layer])
        status = env.local.call("wait_layers", tid, i + 1, TIMEOUT_S)
        assert status["layers_done"] == tuple(push_order[: i + 1])
        got = env.local.call("blocks", rx, dst_ids)
        for other in range(layout.num_layers):
            landed = other in push_order[: i + 1]
            expect = as_bytes(want[other]) if landed else np.zeros_like(got[other])
            assert np.array_equal(got[other], expect), f"layer {other} after pushing {layer}"
    assert env.local.call("wait", tid, TIMEOUT_S)["state"] == "done"


def test_concurrent_transfers_from_two_senders(env, ends):
    rx, endpoint = ends.receiver(env.local, env.layout(receiver=True))
    senders = [
        (peer, ends.sender(peer, env.layout(receiver=False), seed), seed)
        for peer, seed in zip(env.peers, (21, 22), strict=True)
    ]
    layout = env.layout(receiver=True)
    plan = []  # (peer, sender, seed, tid, src_ids, dst_ids); 4 transfers into disjoint blocks
    for i in range(4):
        peer, tx, seed = senders[i % 2]
        src_ids, dst_ids = [3 * i, 3 * i + 1, 23 - i], [20 - 5 * i, 21 - 5 * i, 22 - 5 * i]
        tid = env.new_id("concurrent")
        env.local.call("expect", rx, tid, dst_ids, TIMEOUT_S)
        peer.call("start", tx, tid, src_ids, [endpoint], TIMEOUT_S)
        plan.append((peer, tx, seed, tid, src_ids, dst_ids))
    for layer in range(layout.num_layers):  # interleaved: every transfer is mid-flight at once
        for peer, tx, _, tid, _, _ in plan:
            peer.call("push", tx, tid, [layer])
    for peer, _, seed, tid, src_ids, dst_ids in plan:
        assert env.local.call("wait", tid, TIMEOUT_S)["state"] == "done"
        assert peer.call("wait_released", tid, TIMEOUT_S)["state"] == "done"
        want = shard(content(layout, seed), layout)[:, :, src_ids]
        assert np.array_equal(env.local.call("blocks", rx, dst_ids), as_bytes(want))


@pytest.mark.parametrize("canceller", ["receiver", "sender"])
def test_cancel_in_the_middle(env, ends, canceller):
    tx, rx, endpoint = setup_pair(env, ends, seed=13)
    src_ids, dst_ids = [1, 2, 3], [4, 5, 6]
    tid = env.new_id("cancel")
    env.local.call("expect", rx, tid, dst_ids, TIMEOUT_S)
    env.peers[0].call("start", tx, tid, src_ids, [endpoint], TIMEOUT_S)
    env.peers[0].call("push", tx, tid, [0, 1])
    assert env.local.call("wait_layers", tid, 2, TIMEOUT_S)["layers_done"] == (0, 1)
    side, other = (env.local, env.peers[0]) if canceller == "receiver" else (env.peers[0], env.local)
    side.call("cancel", tid, "client went away")
    mine, theirs = side.call("wait_released", tid, 10), other.call("wait_released", tid, 10)
    assert mine["state"] == "cancelled" and mine["error"] == "client went away"
    assert theirs["state"] == "failed" and "client went away" in theirs["error"]
    assert mine["released"] and theirs["released"]
    env.peers[0].call("push", tx, tid, [2, 3])  # the prefill finishes its forward: a no-op
    time.sleep(0.2)
    got = env.local.call("blocks", rx, dst_ids)
    assert not got[2:].any(), "layers pushed after the cancel were written"
    assert env.local.call("status", tid)["release_log"]["block_ids"] == tuple(dst_ids)


def test_deadline_expiry_releases_blocks_and_tells_the_sender(env, ends):
    tx, rx, endpoint = setup_pair(env, ends, seed=14)
    tid = env.new_id("deadline")
    env.local.call("expect", rx, tid, [8, 9], 1.0)
    env.peers[0].call("start", tx, tid, [0, 1], [endpoint], TIMEOUT_S)
    env.peers[0].call("push", tx, tid, [0])  # the other layers never come
    received = env.local.call("wait", tid, 10)
    assert received["state"] == "failed" and "deadline of 1s passed" in received["error"]
    assert received["waited_s"] < 3.0
    assert env.local.call("wait_released", tid, 10)["released"]
    sent = env.peers[0].call("wait_released", tid, 10)
    assert sent["state"] == "failed" and "aborted: deadline of 1s passed" in sent["error"]
    assert sent["released"]


def test_sender_killed_mid_transfer_fails_fast(env, ends):
    doomed = Peer()
    try:
        rx, endpoint = ends.receiver(env.local, env.layout(receiver=True))
        tx = ends.sender(doomed, env.layout(receiver=False), seed=15)
        tid = env.new_id("killed-tx")
        env.local.call("expect", rx, tid, [1, 2], TIMEOUT_S)
        doomed.call("start", tx, tid, [3, 4], [endpoint], TIMEOUT_S)
        doomed.call("push", tx, tid, [0, 1])
        env.local.call("wait_layers", tid, 2, TIMEOUT_S)
        started = time.monotonic()
        doomed.kill()
        received = env.local.call("wait_released", tid, TIMEOUT_S)
        assert time.monotonic() - started < 5.0, "the receiver noticed only at its deadline"
        assert received["state"] == "failed" and "disconnected" in received["error"]
        assert received["released"]  # the dead sender can write nothing: blocks come back
    finally:
        doomed.close()


def test_receiver_killed_mid_transfer_fails_fast(env, ends):
    doomed = Peer()
    try:
        rx, endpoint = ends.receiver(doomed, env.layout(receiver=True))
        tx = ends.sender(env.local, env.layout(receiver=False), seed=16)
        tid = env.new_id("killed-rx")
        doomed.call("expect", rx, tid, [1, 2], TIMEOUT_S)
        env.local.call("start", tx, tid, [3, 4], [endpoint], TIMEOUT_S)
        env.local.call("push", tx, tid, [0, 1])
        doomed.call("wait_layers", tid, 2, TIMEOUT_S)
        started = time.monotonic()
        doomed.kill()
        sent = env.local.call("wait_released", tid, TIMEOUT_S)
        assert time.monotonic() - started < 5.0, "the sender noticed only at its deadline"
        assert sent["state"] == "failed" and "disconnected" in sent["error"]
        assert sent["released"]
    finally:
        doomed.close()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dtype", "float16", "dtype: sender has 'float16', receiver has 'bfloat16'"),
        ("block_size", 8, "block_size: sender has 8, receiver has 4"),
        ("model_id", "other-model@1", "model_id: sender has 'other-model@1'"),
        ("version", 2, "version: sender has 2, receiver has 1"),
        ("backend", None, "backend: sender uses"),
    ],
)
def test_handshake_mismatch_names_the_field(env, ends, field, value, message):
    rx, endpoint = ends.receiver(env.peers[0], env.layout(receiver=True))
    if field == "backend":
        other = next(b for b in ("shm", "torch_dist") if b != env.backend)
        tx = ends.sender(env.local, make_layout(), seed=17, backend=other)
    else:
        tx = ends.sender(env.local, env.layout(receiver=False, **{field: value}), seed=17)
    with pytest.raises(HandshakeError, match=re.escape(message)):
        env.local.call("connect", tx, endpoint)
    tid = env.new_id("mismatch")
    env.local.call("start", tx, tid, [0], [endpoint], TIMEOUT_S)
    sent = env.local.call("wait_released", tid, 0)
    assert sent["state"] == "failed" and message in sent["error"] and sent["released"]


WRONG_SECRET = b"not-this-deployment-secret-0123456"


def test_a_sender_without_the_secret_is_refused_and_writes_nothing(env, ends):
    rx, endpoint = ends.receiver(env.local, env.layout(receiver=True))
    tx = ends.sender(env.peers[0], env.layout(receiver=False), seed=23, secret=WRONG_SECRET)
    before = env.local.call("cache", rx)
    with pytest.raises(PeerError, match="authentication failed"):
        env.peers[0].call("connect", tx, endpoint)
    tid = env.new_id("intruder")
    env.local.call("expect", rx, tid, [0, 1], 1.0)
    env.peers[0].call("start", tx, tid, [0, 1], [endpoint], TIMEOUT_S)
    env.peers[0].call("push", tx, tid, list(range(env.layout(receiver=False).num_layers)))
    sent = env.peers[0].call("wait_released", tid, TIMEOUT_S)
    assert sent["state"] == "failed" and "authentication failed" in sent["error"]
    received = env.local.call("wait_released", tid, TIMEOUT_S)  # its own deadline: nobody began
    assert received["state"] == "failed" and received["released"]
    assert np.array_equal(env.local.call("cache", rx), before)


def test_a_receiver_without_the_secret_gets_no_kv(env, ends):
    rx, endpoint = ends.receiver(env.local, env.layout(receiver=True), secret=WRONG_SECRET)
    tx = ends.sender(env.peers[0], env.layout(receiver=False), seed=29)
    tid = env.new_id("impostor")
    env.peers[0].call("start", tx, tid, [0], [endpoint], TIMEOUT_S)
    sent = env.peers[0].call("wait_released", tid, TIMEOUT_S)
    # The receiver refuses the sender's proof; had it not, the sender refuses the receiver's.
    assert sent["state"] == "failed" and (
        "authentication failed" in sent["error"] or "does not hold this deployment's KV secret" in sent["error"]
    )

"""Different TP sizes on the two sides: each decode rank gets exactly its heads, from the
right prefill ranks, over every backend (conftest.env), in real processes."""

from __future__ import annotations

import numpy as np

from tests.kv_transfer.peer import as_bytes, content, shard

TIMEOUT_S = 30.0
SEED = 31
SRC_IDS, DST_IDS = [4, 9, 1, 16, 0], [3, 22, 8, 12, 5]


def expected(layout) -> np.ndarray:
    """The whole receiver cache: its own heads of the source blocks, zeros elsewhere."""
    want = shard(content(layout, SEED), layout)
    dst = want.new_zeros(want.shape)
    dst[:, :, DST_IDS] = want[:, :, SRC_IDS]
    return as_bytes(dst)


def test_prefill_tp2_to_decode_tp1(env, ends):
    rx_layout = env.layout(receiver=True, tp_size=1)
    rx, endpoint = ends.receiver(env.local, rx_layout)
    tid = env.new_id("tp2to1")
    env.local.call("expect", rx, tid, DST_IDS, TIMEOUT_S)
    senders = []
    for rank, peer in enumerate(env.peers):
        tx = ends.sender(peer, env.layout(receiver=False, tp_rank=rank, tp_size=2), SEED)
        peer.call("start", tx, tid, SRC_IDS, [endpoint], TIMEOUT_S)
        senders.append((peer, tx))
    for layer in range(rx_layout.num_layers):
        for peer, tx in senders:
            peer.call("push", tx, tid, [layer])
    assert env.local.call("wait", tid, TIMEOUT_S)["state"] == "done"
    for peer, _ in senders:
        assert peer.call("wait_released", tid, TIMEOUT_S)["state"] == "done"
    assert np.array_equal(env.local.call("cache", rx), expected(rx_layout))


def test_prefill_tp1_to_decode_tp2(env, ends):
    tid = env.new_id("tp1to2")
    receivers = []
    for rank, peer in enumerate(env.peers):
        layout = env.layout(receiver=True, tp_rank=rank, tp_size=2)
        rx, endpoint = ends.receiver(peer, layout)
        peer.call("expect", rx, tid, DST_IDS, TIMEOUT_S)
        receivers.append((peer, rx, endpoint, layout))
    tx = ends.sender(env.local, env.layout(receiver=False, tp_size=1), SEED)
    env.local.call("start", tx, tid, SRC_IDS, [r[2] for r in receivers], TIMEOUT_S)
    env.local.call("push", tx, tid, list(range(4)))
    assert env.local.call("wait_released", tid, TIMEOUT_S)["state"] == "done"
    for peer, rx, _, layout in receivers:
        assert peer.call("wait", tid, TIMEOUT_S)["state"] == "done"
        assert np.array_equal(peer.call("cache", rx), expected(layout))


def test_a_missing_decode_rank_fails_the_transfer(env, ends):
    rx, endpoint = ends.receiver(env.peers[0], env.layout(receiver=True, tp_rank=0, tp_size=2))
    tx = ends.sender(env.local, env.layout(receiver=False, tp_size=1), SEED)
    tid = env.new_id("missing-rank")
    env.local.call("start", tx, tid, SRC_IDS, [endpoint], TIMEOUT_S)
    sent = env.local.call("wait_released", tid, 0)
    assert sent["state"] == "failed" and "no endpoint for decode rank(s) [(0, 1)]" in sent["error"]

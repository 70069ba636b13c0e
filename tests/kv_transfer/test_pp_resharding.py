"""Pipeline stages on either side: each decode rank gets exactly the layers and heads it holds,
from the prefill ranks that hold them, over every backend (conftest.env), in real processes.

The model has 4 layers and 4 KV heads (peer.make_layout); stages split the layers unevenly."""

from __future__ import annotations

import numpy as np
import pytest

from kv_transfer.resharding import peers_of, senders_by_layer
from tests.kv_transfer.peer import as_bytes, content, make_layout, shard
from tests.kv_transfer.test_tp_resharding import DST_IDS, SEED, SRC_IDS, TIMEOUT_S


def expected(layout) -> np.ndarray:
    """The whole receiver cache: its layers and heads of the source blocks, zeros elsewhere."""
    want = shard(content(layout, SEED), layout)
    dst = want.new_zeros(want.shape)
    dst[:, :, DST_IDS] = want[:, :, SRC_IDS]
    return as_bytes(dst)


def stage_layouts(env, receiver: bool, bounds: tuple[int, ...], tp_size: int = 1) -> list:
    return [
        env.layout(
            receiver=receiver,
            num_layers=bounds[s + 1] - bounds[s],
            pp_rank=s,
            layer_bounds=bounds,
            tp_rank=r,
            tp_size=tp_size,
        )
        for s in range(len(bounds) - 1)
        for r in range(tp_size)
    ]


def run(env, ends, tid: str, senders: list, receivers: list) -> None:
    """Receivers on the peers (then local), senders after; every sender pushes its layers."""
    hosts = [*env.peers, env.local]
    rx = []
    for i, layout in enumerate(receivers):
        host = hosts[i % len(hosts)]
        name, endpoint = ends.receiver(host, layout)
        host.call("expect", name, tid, DST_IDS, TIMEOUT_S)
        rx.append((host, name, endpoint, layout))
    tx = []
    for i, layout in enumerate(senders):
        host = hosts[(len(receivers) + i) % len(hosts)]
        name = ends.sender(host, layout, SEED)
        host.call("start", name, tid, SRC_IDS, [r[2] for r in rx], TIMEOUT_S)
        tx.append((host, name, layout))
    for host, name, layout in tx:
        host.call("push", name, tid, list(layout.layers))
    for host, name, _, layout in rx:
        status = host.call("wait_end", name, tid, TIMEOUT_S)
        assert status["state"] == "done", status
        assert sorted(status["layers_done"]) == list(layout.layers)
        assert np.array_equal(host.call("cache", name), expected(layout)), f"rank {layout.pp_rank}/{layout.tp_rank}"
    for host, name, _ in tx:
        assert host.call("wait_end", name, tid, TIMEOUT_S)["state"] == "done"


def test_prefill_pp2_to_decode_pp1(env, ends):
    run(env, ends, env.new_id("pp2to1"), stage_layouts(env, False, (0, 1, 4)), stage_layouts(env, True, (0, 4)))


def test_prefill_pp1_to_decode_pp2(env, ends):
    run(env, ends, env.new_id("pp1to2"), stage_layouts(env, False, (0, 4)), stage_layouts(env, True, (0, 3, 4)))


def test_stages_that_cut_the_layers_in_different_places(env, ends):
    """Prefill (0-1 | 2-3) to decode (0 | 1-3): the first prefill stage feeds both decode stages."""
    run(env, ends, env.new_id("pp2to2"), stage_layouts(env, False, (0, 2, 4)), stage_layouts(env, True, (0, 1, 4)))


def test_pp2_tp2_prefill_to_pp1_tp1_decode(env, ends):
    run(env, ends, env.new_id("pp2tp2"), stage_layouts(env, False, (0, 2, 4), 2), stage_layouts(env, True, (0, 4)))


def test_a_missing_decode_stage_fails_the_transfer(env, ends):
    tid = env.new_id("pp-missing")
    (first, _second) = stage_layouts(env, True, (0, 2, 4))
    name, endpoint = ends.receiver(env.peers[0], first)
    env.peers[0].call("expect", name, tid, DST_IDS, TIMEOUT_S)
    tx = ends.sender(env.local, env.layout(receiver=False), SEED)
    env.local.call("start", tx, tid, SRC_IDS, [endpoint], TIMEOUT_S)
    sent = env.local.call("wait_released", tid, TIMEOUT_S)
    assert sent["state"] == "failed" and "no endpoint for decode rank(s) [(1, 0)]" in sent["error"], sent


@pytest.mark.parametrize(
    "src, dst, peers, by_layer",
    [
        # (tp, bounds) of each side; the sender rank (stage 0, tp 0)'s receivers, and the
        # receiver rank (stage 0, tp 0)'s senders per layer
        ((1, (0, 2, 4)), (1, (0, 1, 4)), [(0, 0), (1, 0)], {0: {(0, 0)}}),
        ((2, (0, 2, 4)), (1, (0, 4)), [(0, 0)], {0: {(0, 0), (0, 1)}, 3: {(1, 0), (1, 1)}}),
        ((1, (0, 4)), (2, (0, 3, 4)), [(0, 0), (0, 1), (1, 0), (1, 1)], {2: {(0, 0)}}),
    ],
)
def test_who_sends_what_to_whom(src, dst, peers, by_layer):
    (src_tp, src_bounds), (dst_tp, dst_bounds) = src, dst
    sender = make_layout(num_layers=src_bounds[1], layer_bounds=src_bounds, tp_size=src_tp)
    receiver = make_layout(num_layers=dst_bounds[1], layer_bounds=dst_bounds, tp_size=dst_tp)
    assert list(peers_of(sender, dst_tp, dst_bounds)) == peers
    layers = senders_by_layer(receiver, src_tp, src_bounds)
    assert set(layers) == set(receiver.layers)
    for layer, senders in by_layer.items():
        assert layers[layer] == senders

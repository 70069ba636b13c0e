"""A transfer never leaves a request reading blocks that were freed or overwritten.

The danger: a transfer fails (deadline, cancel) while a write is still in flight. If blocks
were handed back at that moment, a late write could land in a block the block manager has
already given to another request, or read a source block a new prefill is overwriting.

These tests hold a write in flight (slow_shm: every layer write takes WRITE_DELAY_S), fail
the transfer in the middle of it, and play the next owner of the blocks: the release
callback records what the blocks held and overwrites them with SCRIBBLE at once. They show:
- the failure is reported at once, but blocks come back only after the in-flight write ended;
- after the release, nothing writes the blocks again (the scribble stays intact);
- a source block scribbled after its release never reaches the receiver.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.kv_transfer.peer import SCRIBBLE, LocalPeer, Peer, as_bytes, content, make_layout, shard
from tests.kv_transfer.slow_backend import WRITE_DELAY_S

SEED = 41
SRC_IDS, DST_IDS = [2, 5, 7], [10, 11, 12]


@pytest.fixture
def pair():
    """Receiver here, sender in a child process, both on slow_shm."""
    local, peer = LocalPeer(), Peer()
    endpoint = local.call("receiver", "rx", "slow_shm", make_layout())
    peer.call("sender", "tx", "slow_shm", make_layout(), SEED)
    yield local, peer, endpoint
    peer.close()
    local.close()


def source_bytes() -> np.ndarray:
    layout = make_layout()
    return as_bytes(shard(content(layout, SEED), layout)[:, :, SRC_IDS])


def test_receiver_releases_only_after_the_in_flight_write_and_never_sees_it_again(pair):
    local, peer, endpoint = pair
    local.call("expect", "rx", "t", DST_IDS, WRITE_DELAY_S / 2, scribble=True)
    peer.call("start", "tx", "t", SRC_IDS, [endpoint], 30.0)
    peer.call("push", "tx", "t", [0, 1, 2, 3])  # layer 0 is in flight until ~WRITE_DELAY_S

    failed = local.call("wait", "t", 5.0)  # at the deadline, in the middle of layer 0's write
    assert failed["state"] == "failed" and "deadline" in failed["error"]
    assert not failed["released"], "blocks were released while layer 0 was still being written"

    released = local.call("wait_released", "t", 5.0)
    at_release = released["release_log"]["bytes"]
    want = source_bytes()
    assert np.array_equal(at_release[0], want[0]), "the in-flight write had not finished"
    assert not at_release[1:].any(), "layers queued after the failure were written"
    sent = peer.call("wait_released", "t", 5.0)
    assert sent["state"] == "failed" and sent["released"]

    time.sleep(1.5 * WRITE_DELAY_S)  # long enough for a stray write of layer 1 to land
    after = local.call("blocks", "rx", DST_IDS)
    assert (after == SCRIBBLE).all(), "a write landed in blocks after they were released"


def test_sender_releases_only_after_the_in_flight_write_read_its_blocks(pair):
    local, peer, endpoint = pair
    local.call("expect", "rx", "t", DST_IDS, 30.0)
    peer.call("start", "tx", "t", SRC_IDS, [endpoint], 30.0, scribble=True)
    peer.call("push", "tx", "t", [0, 1])
    time.sleep(WRITE_DELAY_S / 3)  # layer 0 is in flight
    peer.call("cancel", "t", "prefill preempted")

    cancelled = peer.call("status", "t")
    assert cancelled["state"] == "cancelled"
    assert not cancelled["released"], "source blocks were released under an in-flight write"
    assert peer.call("wait_released", "t", 5.0)["released"]
    received = local.call("wait_released", "t", 5.0)
    assert received["state"] == "failed" and "prefill preempted" in received["error"]

    time.sleep(1.5 * WRITE_DELAY_S)
    got = local.call("blocks", "rx", DST_IDS)
    # Layer 0 carries the bytes read before the release, never the scribble written after it.
    assert np.array_equal(got[0], source_bytes()[0])
    assert not got[1:].any()

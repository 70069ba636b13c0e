"""The compatibility check: what must match, what may differ, and messages that name fields."""

from __future__ import annotations

import dataclasses

import pytest

from kv_transfer import HandshakeError
from kv_transfer.handshake import PROTOCOL_VERSION, check_compatible
from tests.kv_transfer.peer import make_layout


def test_tp_split_block_count_and_device_may_differ():
    sender = make_layout(tp_rank=1, tp_size=2, num_blocks=100)
    receiver = make_layout(tp_rank=0, tp_size=4, num_blocks=7, device="cuda:3")
    check_compatible(sender, receiver, "nixl", "nixl")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("version", 2, "version: sender has 2, receiver has 1"),
        ("model_id", "llama-3-8b@abc", "model_id: sender has 'llama-3-8b@abc', receiver has 'tiny-llama@1'"),
        ("dtype", "float32", "dtype: sender has 'float32', receiver has 'bfloat16'"),
        ("block_size", 16, "block_size: sender has 16, receiver has 4"),
        ("num_layers", 2, "total_num_layers: sender has 2, receiver has 4"),
        ("head_dim", 32, "head_dim: sender has 32, receiver has 16"),
    ],
)
def test_a_mismatch_names_its_field(field, value, message):
    receiver = make_layout()
    changes = {field: value, "layer_bounds": ()} if field == "num_layers" else {field: value}
    sender = dataclasses.replace(receiver, **changes)
    with pytest.raises(HandshakeError, match=message):
        check_compatible(sender, receiver, "shm", "shm")


def test_pipeline_stages_may_differ_but_not_the_model_depth():
    receiver = make_layout(num_layers=3, pp_rank=1, layer_bounds=(0, 1, 4))
    check_compatible(make_layout(num_layers=2, pp_rank=0, layer_bounds=(0, 2, 4)), receiver, "shm", "shm")
    with pytest.raises(HandshakeError, match="total_num_layers: sender has 6, receiver has 4"):
        check_compatible(make_layout(num_layers=2, pp_rank=2, layer_bounds=(0, 2, 4, 6)), receiver, "shm", "shm")


def test_a_layout_names_a_bad_stage_split():
    with pytest.raises(ValueError, match="must increase"):
        make_layout(num_layers=2, layer_bounds=(0, 2, 2))
    with pytest.raises(ValueError, match="num_layers must be the layers of stage 1"):
        make_layout(num_layers=2, pp_rank=1, layer_bounds=(0, 1, 4))
    with pytest.raises(ValueError, match="pp_rank must be in"):
        make_layout(num_layers=2, pp_rank=2, layer_bounds=(0, 2, 4))


def test_every_mismatch_is_reported_at_once():
    receiver = make_layout()
    sender = make_layout(dtype="float16", block_size=8)
    with pytest.raises(HandshakeError) as info:
        check_compatible(sender, receiver, "shm", "nixl", PROTOCOL_VERSION + 1)
    for field in ("protocol", "backend", "dtype", "block_size"):
        assert f"{field}: sender" in str(info.value)

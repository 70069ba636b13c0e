"""A test-only backend: shm whose every layer write takes WRITE_DELAY_S longer.

It holds a write in flight long enough for a deadline or a cancel to land in the middle of
it, which is how test_ownership.py shows that blocks are never released under a write.
"""

from __future__ import annotations

import time

import numpy as np

from kv_transfer.backends.shm import ShmTransport
from kv_transfer.transport import SendLink

WRITE_DELAY_S = 1.0


class _SlowLink(SendLink):
    def __init__(self, inner: SendLink):
        self._inner = inner

    def write_layer(
        self, layer_idx: int, src_block_ids: np.ndarray, dst_block_ids: np.ndarray, seq: int, deadline: float
    ) -> None:
        time.sleep(WRITE_DELAY_S)  # in flight: the bytes land only at the end
        self._inner.write_layer(layer_idx, src_block_ids, dst_block_ids, seq, deadline)

    def close(self) -> None:
        self._inner.close()


class SlowShmTransport(ShmTransport):
    name = "slow_shm"

    def open_send_link(self, *args, **kwargs) -> SendLink:
        return _SlowLink(super().open_send_link(*args, **kwargs))

"""Routing policies: which prefill and which decode worker take a request.

`load` (the default) sends a prompt to the prefill worker where most of it is already
cached, net of queued work, and decodes where KV blocks are most free; `round_robin` is
the baseline. Prefix overlap is what the router itself has routed to a worker (block
hashes, the same chained hashes the engine's prefix cache uses), so it costs no call.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from engine.block_manager import prefix_block_hashes
from engine.engine_loop import Unavailable

POLICIES = ("load", "round_robin")
MAX_TRACKED_BLOCKS = 200_000  # per worker; the oldest hashes are forgotten first


@dataclass
class WorkerView:
    """What the router knows about one worker: its last stats and its likely cached prefixes."""

    index: int
    stats: dict[str, float]
    cached: "OrderedDict[bytes, None]"
    alive: bool = True  # False once its stats call failed (dead actor, broken engine)

    def overlap_blocks(self, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cached:
                break
            n += 1
        return n

    def remember(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.cached[h] = None
            self.cached.move_to_end(h)
        while len(self.cached) > MAX_TRACKED_BLOCKS:
            self.cached.popitem(last=False)


class Router:
    def __init__(self, policy: str, num_prefill: int, num_decode: int, block_size: int):
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.block_size = block_size
        self.prefill = [WorkerView(i, {}, OrderedDict()) for i in range(num_prefill)]
        self.decode = [WorkerView(i, {}, OrderedDict()) for i in range(num_decode)]
        self._turns = {"prefill": itertools.count(), "decode": itertools.count()}  # round robin's positions

    def hashes(self, token_ids: list[int]) -> list[bytes]:
        return prefix_block_hashes(token_ids, self.block_size)

    def pick_decode(self, hashes: list[bytes]) -> WorkerView:
        if self.policy == "round_robin":
            return self._next(self.decode, "decode")

        def score(w: WorkerView):
            free = w.stats.get("num_free_blocks", 0) / max(1.0, w.stats.get("num_blocks", 1))
            busy = w.stats.get("num_running", 0) + w.stats.get("num_reserved", 0) + w.stats.get("num_waiting", 0)
            return (free, -busy, w.overlap_blocks(hashes))
        return max(_alive(self.decode, "decode"), key=score)

    def pick_prefill(self, hashes: list[bytes]) -> WorkerView:
        if self.policy == "round_robin":
            return self._next(self.prefill, "prefill")

        def score(w: WorkerView):
            queued = w.stats.get("num_waiting", 0) + w.stats.get("num_running", 0)
            # A cached block saves a block of compute; a queued request costs about one prompt.
            return w.overlap_blocks(hashes) - queued * max(1, len(hashes))
        return max(_alive(self.prefill, "prefill"), key=score)

    def _next(self, views: list[WorkerView], role: str) -> WorkerView:
        alive = _alive(views, role)
        return alive[next(self._turns[role]) % len(alive)]


def _alive(views: list[WorkerView], role: str) -> list[WorkerView]:
    """The live workers; Unavailable when none is."""
    alive = [v for v in views if v.alive]
    if not alive:
        raise Unavailable(f"no {role} worker is up (of {len(views)})")
    return alive

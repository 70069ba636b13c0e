"""Routing policies: which prefill and which decode worker take a request, and which running
request a decode worker short of KV blocks sheds to another (pick_shed).

`load` (the default) sends a prompt to the prefill worker where most of it is already
cached, net of queued work, and decodes where KV blocks are most free; `round_robin` is
the baseline. Prefix overlap is what the router itself has routed to a worker (block
hashes, the same chained hashes the engine's prefix cache uses), so it costs no call.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.block_manager import prefix_block_hashes
from proto.errors import Unavailable
from proto.serving import WorkerStats

POLICIES = ("load", "round_robin")
MAX_TRACKED_BLOCKS = 200_000  # per worker; the oldest hashes are forgotten first
MISSES_BEFORE_DOWN = 2  # stats calls in a row without an answer in time before a worker is down
# Migration for load balancing (pick_shed): a decode worker at least SHED_ABOVE full (or one
# that preempted since its last stats) sheds a running request to one under TAKE_BELOW that
# stays under it with the request. A request only ever moves from above SHED_ABOVE to below
# TAKE_BELOW, so no move can make its destination shed it back.
SHED_ABOVE = 0.9
TAKE_BELOW = 0.6


@dataclass
class WorkerView:
    """What the router knows about one worker: its last stats and its likely cached prefixes."""

    index: int
    cached: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    stats: WorkerStats | None = None  # from its last stats call (None before the first)
    alive: bool = True  # False once a stats call failed (dead actor, broken engine); no stats then
    routed: int = 0  # requests sent to it since its last stats call, which they are not in yet
    lost_at: float = float("-inf")  # when a request last found it gone (time.monotonic())
    missed: int = 0  # stats calls in a row that timed out
    draining: bool = False  # being drained (DisaggregatedBackend.drain): no new request goes to it
    preempting: bool = False  # its preemption count rose between its last two stats
    retired: bool = False  # not a worker of this role (any more): it changed role, or was removed

    @property
    def serving(self) -> bool:
        """Up and taking new requests."""
        return self.alive and not self.draining and not self.retired

    def timed_out(self) -> None:
        """A stats call got no answer in time: down only after MISSES_BEFORE_DOWN in a row (a
        worker busy on a loaded machine answers late; a dead one raises instead, and a
        request that finds it gone marks it down at once)."""
        self.missed += 1
        if self.missed >= MISSES_BEFORE_DOWN:
            self.stats, self.alive = None, False

    def update(self, stats: WorkerStats | None, asked_at: float = float("inf")) -> None:
        """The outcome of a stats call asked at asked_at: the worker's gauges, or None when it
        did not answer. An answer to a call asked before the worker was lost is stale."""
        if stats is not None and asked_at < self.lost_at:
            return
        before = self.stats
        self.preempting = stats is not None and before is not None and stats.num_preemptions > before.num_preemptions
        self.stats, self.alive, self.routed, self.missed = stats, stats is not None, 0, 0

    def lost(self, now: float) -> None:
        """A request found the worker gone: down until a stats call asked from now on answers."""
        self.stats, self.alive, self.lost_at = None, False, now

    @property
    def load(self) -> int:
        """Requests on it or on their way to it, as far as the router knows."""
        s = self.stats or IDLE
        return s.num_running + s.num_reserved + s.num_waiting + self.routed

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


class RoutingPolicy:
    """Picks a worker of each role for a request, by the policy's rule, among live workers."""

    def __init__(self, policy: str, num_prefill: int, num_decode: int, block_size: int):
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.block_size = block_size
        self.prefill = [WorkerView(i) for i in range(num_prefill)]
        self.decode = [WorkerView(i) for i in range(num_decode)]
        self._turns = {"prefill": itertools.count(), "decode": itertools.count()}  # round robin's positions

    def hashes(self, token_ids: list[int]) -> list[bytes]:
        return prefix_block_hashes(token_ids, self.block_size)

    def pick_decode(self, hashes: list[bytes], exclude: int | None = None) -> WorkerView:
        """exclude: a worker not to pick (the one a request migrates away from)."""
        views = [v for v in self.decode if v.index != exclude]
        if self.policy == "round_robin":
            return self._next(views, "decode")

        def score(w: WorkerView):
            # KV room first (to a tenth: stats between two calls are the same, so finer
            # differences would send a whole burst to one worker), then the fewest requests,
            # then the longest cached prefix.
            room = round(1.0 - (w.stats or IDLE).kv_usage, 1)
            return (room, -w.load, w.overlap_blocks(hashes))

        return _routed(max(_alive(views, "decode"), key=score))

    def pick_prefill(self, hashes: list[bytes]) -> WorkerView:
        if self.policy == "round_robin":
            return self._next(self.prefill, "prefill")

        def score(w: WorkerView):
            # A cached block saves a block of compute; a queued request costs about one prompt.
            return w.overlap_blocks(hashes) - w.load * max(1, len(hashes))

        return _routed(max(_alive(self.prefill, "prefill"), key=score))

    def _next(self, views: list[WorkerView], role: str) -> WorkerView:
        alive = _alive(views, role)
        return alive[next(self._turns[role]) % len(alive)]


# What a worker that has not reported yet is taken to be: empty.
IDLE = WorkerStats(
    num_waiting=0,
    num_running=0,
    num_reserved=0,
    num_held=0,
    num_transfers=0,
    num_free_blocks=0,
    num_blocks=0,
    num_preemptions=0,
)


@dataclass(frozen=True)
class Running:
    """A request decoding on a decode worker, as the router knows it."""

    run_id: str
    decode: int  # the worker's index
    num_tokens: int  # prompt and tokens so far


def pick_shed(views: list[WorkerView], running: list[Running], block_size: int) -> tuple[Running, int] | None:
    """Load balancing by live migration: the request to move off the decode worker under the
    most KV pressure (SHED_ABOVE full, or preempting) and the worker to move it to (the one
    with the most room, under TAKE_BELOW and staying under it with the request). The largest
    request that fits moves, as it frees the most blocks. None when no worker is pressed, or
    none has room."""
    known = [(v, v.stats) for v in views if v.alive and v.stats is not None and v.stats.num_blocks]
    pressed = [(v, s) for v, s in known if v.preempting or s.kv_usage >= SHED_ABOVE]
    roomy = [(v, s) for v, s in known if v.serving and s.kv_usage < TAKE_BELOW]
    if not pressed or not roomy:
        return None
    src = max(pressed, key=lambda p: p[1].kv_usage)[0]
    dst, stats = min(roomy, key=lambda p: p[1].kv_usage)
    room = int(stats.num_blocks * TAKE_BELOW) - (stats.num_blocks - stats.num_free_blocks)
    fits = [r for r in running if r.decode == src.index and -(-(r.num_tokens + 1) // block_size) <= room]
    return (max(fits, key=lambda r: r.num_tokens), dst.index) if fits and dst is not src else None


def _routed(view: WorkerView) -> WorkerView:
    view.routed += 1
    return view


def _alive(views: list[WorkerView], role: str) -> list[WorkerView]:
    """The workers that take new requests; Unavailable when none does."""
    alive = [v for v in views if v.serving]
    if not alive:
        members = [v for v in views if not v.retired]
        draining = sum(v.draining for v in members)
        raise Unavailable(
            f"no {role} worker is up (of {len(members)}" + (f", {draining} draining)" if draining else ")")
        )
    return alive

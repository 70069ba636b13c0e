"""KV traffic between prefill and decode, and the rate a placement serves (max-flow).

Every request ships its prompt's KV once, from the node that prefilled it to the node
that decodes it. Inside a node it crosses the GPU-to-GPU link; between nodes it leaves
one NIC and enters another, and a cluster link, when listed, caps the pair. Limits are
kept in requests/s; a path too slow for the SLO has limit 0. The flow network of a
placement::

    source --prefill capacity--> P_n --intra-node--> D_n --decode capacity--> sink
                                 P_n --NIC out--> O_n --link--> I_m --NIC in--> D_m

The MILP (planner/solve/milp.py) states this network as constraints; max_served_rate solves it
combinatorially for a fixed placement, which is how enumeration and the baseline score
placements without the MILP.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from planner.latency.gpus import NodeHardware
from proto.cluster import ClusterSpec

# Transfers queue on a busy link and the wait lands in TPOT: at half load a transfer
# waits about half its own time on average (M/D/1).
BANDWIDTH_UTILIZATION = 0.5


@dataclass(frozen=True)
class Traffic:
    """Per-node and per-pair KV transfer limits in requests/s."""

    node_names: tuple[str, ...]
    local_rps: dict[str, float]  # prefill and decode in the same node
    nic_rps: dict[str, float]  # leaving (or entering) the node, each direction
    link_rps: dict[frozenset, float]  # caps of listed node pairs

    def pair_rps(self, a: str, b: str) -> float:
        return self.link_rps.get(frozenset((a, b)), math.inf)


def traffic_limits(
    cluster: ClusterSpec,
    hardware: dict[str, NodeHardware],
    kv_bytes_per_request: float,
    kv_bytes_large: float,
    max_transfer_s: float,
) -> Traffic:
    """Limits for KV of kv_bytes_per_request on average.

    A path is closed (limit 0) when a large prompt's KV (kv_bytes_large) takes longer than
    max_transfer_s on it: the transfer delays that request's tokens after the first, so on
    slow links prefill and decode must share a node (DistServe's low-affinity placement).
    """

    def rps(gb_s: float) -> float:
        if gb_s <= 0 or kv_bytes_large / (gb_s * 1e9) > max_transfer_s:
            return 0.0
        return gb_s * 1e9 * BANDWIDTH_UTILIZATION / kv_bytes_per_request

    return Traffic(
        node_names=tuple(n.name for n in cluster.nodes),
        local_rps={n.name: rps(hardware[n.name].link_gb_s) for n in cluster.nodes},
        nic_rps={n.name: rps(n.nic_gb_s) for n in cluster.nodes},
        link_rps={frozenset((link.a, link.b)): rps(link.gb_s) for link in cluster.links},
    )


class _FlowGraph:
    """Dinic's max-flow on float capacities."""

    def __init__(self):
        self.adj: dict[object, list[int]] = {}
        self.to: list[object] = []
        self.cap: list[float] = []

    def add(self, u, v, cap: float) -> int:
        for node in (u, v):
            self.adj.setdefault(node, [])
        self.adj[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(cap)
        self.adj[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)
        return len(self.to) - 2

    def max_flow(self, s, t, eps: float = 1e-9) -> float:
        total = 0.0
        while True:
            level = {s: 0}
            queue = deque([s])
            while queue:
                u = queue.popleft()
                for e in self.adj[u]:
                    if self.cap[e] > eps and self.to[e] not in level:
                        level[self.to[e]] = level[u] + 1
                        queue.append(self.to[e])
            if t not in level:
                return total
            it = {u: 0 for u in self.adj}
            while (f := self._push(s, t, math.inf, level, it, eps)) > eps:
                total += f

    def _push(self, u, t, f: float, level: dict, it: dict, eps: float) -> float:
        """One augmenting path of the level graph from u (Dinic's blocking flow); it[u] is the
        next edge of u to try."""
        if u == t:
            return f
        while it[u] < len(self.adj[u]):
            e = self.adj[u][it[u]]
            v = self.to[e]
            if self.cap[e] > eps and level.get(v) == level[u] + 1:
                pushed = self._push(v, t, min(f, self.cap[e]), level, it, eps)
                if pushed > eps:
                    self.cap[e] -= pushed
                    self.cap[e ^ 1] += pushed
                    return pushed
            it[u] += 1
        return 0.0


def max_served_rate(
    traffic: Traffic, prefill_rps: dict[str, float], decode_rps: dict[str, float]
) -> tuple[float, dict[tuple[str, str], float]]:
    """Highest request rate the placement serves, and the prefill->decode node routes.

    Without listed links every pair of NICs can talk, so cross-node traffic goes through
    one hub vertex (O(nodes) edges instead of O(nodes^2)), split into pairs afterwards.
    """
    senders = [n for n in traffic.node_names if prefill_rps.get(n, 0) > 0]
    receivers = [n for n in traffic.node_names if decode_rps.get(n, 0) > 0]
    if not senders or not receivers:
        return 0.0, {}
    g = _FlowGraph()
    local, out, into, pairs = {}, {}, {}, {}  # node or pair -> its edge
    for n in senders:
        g.add("s", ("P", n), prefill_rps[n])
        out[n] = g.add(("P", n), ("O", n), traffic.nic_rps[n])
        if n in receivers:
            local[n] = g.add(("P", n), ("D", n), traffic.local_rps[n])
    for m in receivers:
        g.add(("D", m), "t", decode_rps[m])
        into[m] = g.add(("I", m), ("D", m), traffic.nic_rps[m])
    if traffic.link_rps:
        for n in senders:
            for m in receivers:
                if m != n and traffic.pair_rps(n, m) > 0:
                    pairs[(n, m)] = g.add(("O", n), ("I", m), traffic.pair_rps(n, m))
    else:
        for n in senders:
            g.add(("O", n), "hub", math.inf)
        for m in receivers:
            g.add("hub", ("I", m), math.inf)
    rate = g.max_flow("s", "t")

    def flow(edge: int) -> float:  # the reverse edge's capacity is the flow pushed
        return g.cap[edge ^ 1]

    local_routes = {(n, n): flow(e) for n, e in local.items()}
    if traffic.link_rps:
        remote = {pair: flow(e) for pair, e in pairs.items()}
    else:
        remote = split_hub_traffic({n: flow(e) for n, e in out.items()}, {m: flow(e) for m, e in into.items()})
    return rate, merge_routes(local_routes, remote)


def merge_routes(*parts: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Sum route rates (a hub split may pair a node with itself, beside its local route)."""
    out: dict[tuple[str, str], float] = {}
    for part in parts:
        for pair, rate in part.items():
            out[pair] = out.get(pair, 0.0) + rate
    return {pair: r for pair, r in out.items() if r > 1e-9}


def split_hub_traffic(sent: dict[str, float], received: dict[str, float]) -> dict[tuple[str, str], float]:
    """Pair up what nodes send through the hub with what nodes receive (equal totals).

    Any pairing is valid when only NICs limit traffic; pairing other nodes before a node
    with itself keeps traffic a node sends to itself (which would need no NIC) rare.
    """
    routes: dict[tuple[str, str], float] = {}
    need = {m: r for m, r in received.items() if r > 1e-9}
    for n, amount in sorted(sent.items(), key=lambda kv: -kv[1]):
        for m in sorted(need, key=lambda m: (m == n, -need[m])):
            if amount <= 1e-9:
                break
            moved = min(amount, need[m])
            if moved > 1e-9:
                routes[(n, m)] = routes.get((n, m), 0.0) + moved
                need[m] -= moved
                amount -= moved
        need = {m: r for m, r in need.items() if r > 1e-9}
    return routes

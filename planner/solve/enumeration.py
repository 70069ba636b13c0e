"""Placements found without the MILP: exhaustive search (small clusters) and a baseline.

exhaustive_placement tries every multiset of options on every node and scores each
combination by max-flow (planner/solve/network.py): the ground truth the MILP is tested against.

distserve_placement is what DistServe's placement search does on one GPU type, applied to
each kind of node of a mixed cluster on its own: it enumerates a node-sized unit (some
prefill instances of one configuration plus some decode instances of one configuration,
KV kept inside the node as in DistServe's low-affinity placement), keeps the unit with
the most goodput per node, and replicates it on every node of that kind. It never pairs
one GPU type's prefill with another's decode.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator

from planner.latency.gpus import NodeHardware
from planner.solve.capacity import InstanceOption
from planner.solve.milp import Placement, compatible_options
from planner.solve.network import Traffic, max_served_rate
from proto.cluster import ClusterSpec
from proto.plan import SolverInfo


def node_fillings(option_ids: list[int], options: list[InstanceOption], num_gpus: int) -> Iterator[dict[int, int]]:
    """Every multiset of options that fits num_gpus (as option index -> count)."""
    if not option_ids:
        yield {}
        return
    first, rest = option_ids[0], option_ids[1:]
    for k in range(num_gpus // options[first].num_gpus + 1):
        for tail in node_fillings(rest, options, num_gpus - k * options[first].num_gpus):
            yield {first: k, **tail} if k else tail


def served_rate(
    counts: dict[tuple[str, int], int], options: list[InstanceOption], traffic: Traffic
) -> tuple[float, dict[tuple[str, str], float]]:
    prefill: defaultdict[str, float] = defaultdict(float)
    decode: defaultdict[str, float] = defaultdict(float)
    for (n, i), c in counts.items():
        (prefill if options[i].role == "prefill" else decode)[n] += c * options[i].capacity_rps
    return max_served_rate(traffic, prefill, decode)


def exhaustive_placement(
    cluster: ClusterSpec,
    hardware: dict[str, NodeHardware],
    options: list[InstanceOption],
    traffic: Traffic,
    objective: str,
    target_rps: float | None = None,
) -> Placement | None:
    """The best placement by brute force; None when no placement reaches target_rps."""
    if objective != "goodput" and target_rps is None:
        raise ValueError("the cost objective needs target_rps")
    target = target_rps or 0.0
    hosts = compatible_options(cluster, hardware, options)
    per_node = [
        [{(n.name, i): c for i, c in filling.items()} for filling in node_fillings(hosts[n.name], options, n.num_gpus)]
        for n in cluster.nodes
    ]
    best, best_key = None, None
    for combo in itertools.product(*per_node):
        counts = {k: c for filling in combo for k, c in filling.items()}
        rate, routes = served_rate(counts, options, traffic)
        cost = sum(options[i].cost_per_hour * c for (_, i), c in counts.items())
        if objective == "goodput":
            key = -rate
        elif rate >= target * (1 - 1e-9):
            key = cost
        else:
            continue
        if best_key is None or key < best_key - 1e-9:
            best_key, best = key, Placement(counts, routes, rate, _no_solver(-key if objective == "goodput" else key))
    return best


def distserve_placement(
    cluster: ClusterSpec, hardware: dict[str, NodeHardware], options: list[InstanceOption], traffic: Traffic
) -> Placement:
    """Replicate, on every node, the best single-type node unit for that node's kind."""
    hosts = compatible_options(cluster, hardware, options)
    counts: dict[tuple[str, int], int] = {}
    unit_cache: dict[tuple, dict[int, int]] = {}
    for node in cluster.nodes:
        kind = (hardware[node.name], node.num_gpus, traffic.local_rps[node.name])
        if kind not in unit_cache:
            unit_cache[kind] = _best_unit(node.name, hosts[node.name], options, node.num_gpus, traffic)
        counts.update({(node.name, i): c for i, c in unit_cache[kind].items()})
    rate, routes = served_rate(counts, options, traffic)
    # Units keep KV inside their node; only those routes are the baseline's.
    local = {pair: r for pair, r in routes.items() if pair[0] == pair[1]}
    return Placement(counts, local, sum(local.values()), _no_solver(sum(local.values())))


def _best_unit(
    node: str, ids: list[int], options: list[InstanceOption], num_gpus: int, traffic: Traffic
) -> dict[int, int]:
    """The (prefill option, decode option, counts) with the most goodput in one node,
    fewest GPUs on ties."""
    best, best_key = {}, (0.0, 0)
    prefill = [i for i in ids if options[i].role == "prefill"]
    decode = [i for i in ids if options[i].role == "decode"]
    for p, d in itertools.product(prefill, decode):
        gp, gd = options[p].num_gpus, options[d].num_gpus
        for num_p in range(1, (num_gpus - gd) // gp + 1):
            for num_d in range(1, (num_gpus - num_p * gp) // gd + 1):
                rate = min(num_p * options[p].capacity_rps, num_d * options[d].capacity_rps, traffic.local_rps[node])
                key = (round(rate, 9), -(num_p * gp + num_d * gd))
                if key > best_key:
                    best, best_key = {p: num_p, d: num_d}, key
    return best


def _no_solver(objective: float) -> SolverInfo:
    return SolverInfo(name="enumeration", status="optimal", gap=0.0, solve_time_s=0.0, objective=objective)

"""The placement MILP: how many instances of each option on each node, and the KV routes.

Variables (n, m nodes; o an option that node n's hardware can host)::

    x[n,o]   integer   instances of option o on node n
    l[n]     >= 0      requests/s prefilled and decoded on node n (KV over the GPU link)
    s[n]     >= 0      requests/s prefilled on n, decoded on another node (leave n's NIC)
    r[m]     >= 0      requests/s decoded on m, prefilled on another node (enter m's NIC)
    t[n,m]   >= 0      only for clusters with listed links: requests/s from n to m

Constraints::

    sum_o gpus(o) x[n,o]            <= GPUs of n
    l[n] + s[n]                     <= sum_{o prefill} cap(o) x[n,o]
    l[n] + r[m=n]                   <= sum_{o decode}  cap(o) x[n,o]
    l[n] <= local cap,  s[n], r[n] <= NIC cap
    sum_n s[n] = sum_m r[m]         (or, with links: s[n] = sum_m t[n,m], r[m] = sum_n t[n,m],
                                     t[n,m] <= link cap)
    rate = sum_n (l[n] + s[n])

Objectives: goodput maximises rate; cost minimises sum cost(o) x[n,o] with rate >= target.
Capacities are each instance's SLO-feasible throughput (planner/solve/capacity.py), so a load
split in proportion to them meets the SLO everywhere. Identical nodes are interchangeable;
ordering their prefill GPU counts removes most of that symmetry from the search.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from planner.latency.gpus import NodeHardware
from planner.solve.capacity import InstanceOption
from planner.solve.network import Traffic, merge_routes, split_hub_traffic
from planner.solve.solver import SolveOptions, solve
from proto.cluster import ClusterSpec
from proto.plan import SolverInfo


@dataclass(frozen=True)
class Placement:
    counts: dict[tuple[str, int], int]  # (node name, option index) -> instances
    routes: dict[tuple[str, str], float]  # (prefill node, decode node) -> requests/s
    rate_rps: float  # requests/s the placement serves within the SLO
    solver: SolverInfo


def compatible_options(
    cluster: ClusterSpec, hardware: dict[str, NodeHardware], options: list[InstanceOption]
) -> dict[str, list[int]]:
    """Indices of the options each node can host: its hardware, at most its GPUs.

    Instance sizes (tp x pp) are powers of two, so any set of instances whose GPUs add up
    to at most the node's count packs into it (largest first, each on GPUs aligned to its
    size): a 3-GPU node holds a tp=2 instance beside a tp=1 one, and the GPU count per
    node is the whole packing constraint.
    """
    return {
        n.name: [i for i, o in enumerate(options) if o.hardware == hardware[n.name] and o.num_gpus <= n.num_gpus]
        for n in cluster.nodes
    }


def solve_placement(
    cluster: ClusterSpec,
    hardware: dict[str, NodeHardware],
    options: list[InstanceOption],
    traffic: Traffic,
    objective: str,
    target_rps: float | None,
    solve_options: SolveOptions,
    progress: Callable[[str], None] | None = None,
    fixed_counts: dict[tuple[str, int], int] | None = None,
) -> Placement:
    """The placement the objective asks for; with fixed_counts, those instances (keyed like
    Placement.counts) and only the routes solved: what a placement serves under new capacities."""
    import pulp

    sense = pulp.LpMaximize if objective == "goodput" else pulp.LpMinimize
    prob = pulp.LpProblem("placement", sense)
    hosts = compatible_options(cluster, hardware, options)
    gpus = {n.name: n.num_gpus for n in cluster.nodes}
    if fixed_counts is None:
        x = {
            (n, i): prob.add_variable(f"x_{k}_{i}", 0, gpus[n] // options[i].num_gpus, cat="Integer")
            for k, n in enumerate(hosts)
            for i in hosts[n]
        }
    else:
        x = {
            (n, i): prob.add_variable(
                f"x_{k}_{i}", fixed_counts.get((n, i), 0), fixed_counts.get((n, i), 0), cat="Integer"
            )
            for k, n in enumerate(hosts)
            for i in hosts[n]
        }
    names = list(hosts)
    idx = {n: k for k, n in enumerate(names)}
    local = {n: prob.add_variable(f"l_{idx[n]}", 0, traffic.local_rps[n]) for n in names}
    send = {n: prob.add_variable(f"s_{idx[n]}", 0, traffic.nic_rps[n]) for n in names}
    recv = {n: prob.add_variable(f"r_{idx[n]}", 0, traffic.nic_rps[n]) for n in names}

    def capacity(n: str, role: str):
        return pulp.lpSum(options[i].capacity_rps * x[n, i] for i in hosts[n] if options[i].role == role)

    for n in names:
        prob += pulp.lpSum(options[i].num_gpus * x[n, i] for i in hosts[n]) <= gpus[n]
        prob += local[n] + send[n] <= capacity(n, "prefill")
        prob += local[n] + recv[n] <= capacity(n, "decode")
    pair = {}
    if traffic.link_rps:
        for n in names:
            for m in names:
                if m != n and traffic.pair_rps(n, m) > 0:
                    pair[n, m] = prob.add_variable(f"t_{idx[n]}_{idx[m]}", 0, min(traffic.pair_rps(n, m), 1e9))
        for n in names:
            prob += send[n] == pulp.lpSum(v for (a, _), v in pair.items() if a == n)
            prob += recv[n] == pulp.lpSum(v for (_, b), v in pair.items() if b == n)
    else:
        prob += pulp.lpSum(send.values()) == pulp.lpSum(recv.values())
    rate = pulp.lpSum(local.values()) + pulp.lpSum(send.values())
    if fixed_counts is None:
        _break_symmetry(prob, cluster, hardware, hosts, options, x)
    if objective == "goodput":
        prob += rate
    else:
        prob += rate >= target_rps
        prob += pulp.lpSum(options[i].cost_per_hour * x[n, i] for (n, i) in x)
    info = solve(prob, solve_options, progress)
    if info.status not in ("optimal", "time_limit"):
        return Placement({}, {}, 0.0, info)
    _balance(prob, x, rate, capacity, names, local, send, recv, solve_options)
    counts = {key: round(v.value() or 0) for key, v in x.items()}
    counts = {key: c for key, c in counts.items() if c > 0}
    local_routes = {(n, n): local[n].value() or 0.0 for n in names}
    if pair:
        remote = {key: v.value() or 0.0 for key, v in pair.items()}
    else:
        remote = split_hub_traffic(
            {n: send[n].value() or 0.0 for n in names}, {n: recv[n].value() or 0.0 for n in names}
        )
    routes = merge_routes(local_routes, remote)
    counts = _drop_idle(counts, options, routes)
    return Placement(counts, routes, float(sum(routes.values())), info)


def _balance(prob, x, rate, capacity, names, local, send, recv, solve_options: SolveOptions) -> None:
    """Among the routes that serve the rate just found on the instances just chosen, take
    those that load each role's nodes most evenly (the least largest share of a node's
    capacity, prefill plus decode): the objective alone leaves the split between nodes with
    room to spare arbitrary, and a node loaded to its capacity queues far longer than one
    loaded to half of it. Best effort: the routes found stand when no better is found in time."""
    import pulp

    served = pulp.value(rate) or 0.0
    if served <= 0:
        return
    found = {var: var.value() for var in prob.variables()}
    for var in x.values():
        var.lowBound = var.upBound = round(var.value() or 0)
    share = {role: prob.add_variable(f"u_{role}", 0) for role in ("prefill", "decode")}
    for n in names:
        prob += local[n] + send[n] <= share["prefill"] * (pulp.value(capacity(n, "prefill")) or 0.0)
        prob += local[n] + recv[n] <= share["decode"] * (pulp.value(capacity(n, "decode")) or 0.0)
    prob += rate >= served - 1e-9
    prob.sense = pulp.LpMinimize
    prob.setObjective(share["prefill"] + share["decode"])
    if solve(prob, solve_options).status not in ("optimal", "time_limit"):
        for var, value in found.items():
            var.varValue = value


def _break_symmetry(prob, cluster, hardware, hosts, options, x) -> None:
    """Order identical nodes (same hardware, GPUs, NIC, no listed link) by prefill GPUs."""
    import pulp

    linked = {name for link in cluster.links for name in (link.a, link.b)}
    classes = defaultdict(list)
    for node in cluster.nodes:
        if node.name not in linked:
            classes[(hardware[node.name], node.num_gpus, node.nic_gb_s)].append(node.name)
    for names in classes.values():
        for a, b in pairwise(names):
            prob += pulp.lpSum(
                options[i].num_gpus * x[a, i] for i in hosts[a] if options[i].role == "prefill"
            ) >= pulp.lpSum(options[i].num_gpus * x[b, i] for i in hosts[b] if options[i].role == "prefill")


def _drop_idle(
    counts: dict[tuple[str, int], int], options: list[InstanceOption], routes: dict[tuple[str, str], float]
) -> dict[tuple[str, int], int]:
    """Remove instances that carry no planned traffic (the goodput objective does not
    penalise them), largest first, while each node keeps capacity for its routes."""
    used: defaultdict[tuple[str, str], float] = defaultdict(float)
    for (p, d), r in routes.items():
        used[p, "prefill"] += r
        used[d, "decode"] += r
    have: defaultdict[tuple[str, str], float] = defaultdict(float)
    for (n, i), c in counts.items():
        have[n, options[i].role] += c * options[i].capacity_rps
    out = dict(counts)
    for n, i in sorted(counts, key=lambda key: -options[key[1]].num_gpus):
        o = options[i]
        while out[n, i] > 0 and have[n, o.role] - o.capacity_rps >= used[n, o.role] - 1e-6:
            out[n, i] -= 1
            have[n, o.role] -= o.capacity_rps
    return {key: c for key, c in out.items() if c > 0}

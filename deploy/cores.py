"""Which CPU cores each worker rank owns: a CPU worker's cores are its device.

Workers that run without GPUs get disjoint sets of their node's cores, `num_cpus` per rank,
in the order they are started; the router (this process) keeps what is left on its node.
Each rank's process then binds to its cores with as many compute threads (engine/cores.py).

  pin=True   every rank gets cores of its own, or deploy() refuses, naming the shortfall;
  pin=None   the same when the nodes have the cores, else nobody is pinned and each rank
             computes with its share of its node's cores (never more threads than cores);
  pin=False  nobody is pinned; threads as above.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.cores import available_cores, thread_env


@dataclass(frozen=True)
class RankCores:
    """One rank's share of its node: its own cores when pinned, else a thread count."""

    cores: tuple[int, ...] | None  # None: not pinned
    num_threads: int

    def env(self) -> dict[str, str]:
        return thread_env(self.num_threads)


@dataclass(frozen=True)
class CorePlan:
    ranks: list[list[RankCores | None]]  # per worker, per rank (None: a GPU rank)
    router: tuple[int, ...] | None  # the cores left to this process, None when it shares
    pinned: bool

    def describe(self, labels: list[str]) -> str:
        """One line per worker, then the router's."""
        lines = []
        for label, ranks in zip(labels, self.ranks, strict=True):
            if all(r is None for r in ranks):
                continue
            parts = [
                f"cores {list(r.cores)}" if r.cores else f"{r.num_threads} thread(s), shared cores"
                for r in ranks
                if r is not None
            ]
            lines.append(f"  {label}: " + "; ".join(parts))
        if self.pinned:
            lines.append(
                f"  router: cores {list(self.router)}"
                if self.router
                else "  router: no core left for it; it shares its node's cores with the workers"
            )
        return "\n".join(lines)


@ray.remote(num_cpus=0)
def _cores_here() -> list[int]:
    return available_cores()


def node_cores(node_id: str) -> list[int]:
    """The cores a process may use on a Ray node (this process's, on the driver's node)."""
    if node_id == ray.get_runtime_context().get_node_id():
        return available_cores()
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.get(_cores_here.options(scheduling_strategy=strategy).remote(), timeout=60)


def plan_cores(groups, pgs, pin: bool | None) -> CorePlan:
    """groups: each worker's WorkerGroup, in start order; pgs: their placement groups."""
    # (worker, rank) -> node, for the ranks that run on CPUs
    placed = defaultdict(list)
    for w, (group, pg) in enumerate(zip(groups, pgs, strict=True)):
        if group.use_gpus:
            continue
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        for rank in range(group.ranks):
            placed[nodes[rank]].append((w, rank, max(1, int(group.num_cpus))))
    ranks: list[list[RankCores | None]] = [[None] * g.ranks for g in groups]
    here = ray.get_runtime_context().get_node_id()
    cores_of = {node: node_cores(node) for node in placed}
    short = {
        node: (sum(n for _, _, n in wanted), len(cores_of[node]))
        for node, wanted in placed.items()
        if sum(n for _, _, n in wanted) > len(cores_of[node])
    }
    if short and pin:
        node, (need, have) = next(iter(short.items()))
        raise ValueError(
            f"the CPU workers need {need} cores on node {node[:8]}, which has {have}: ask for fewer "
            f"workers or cores per worker, or drop the explicit core counts to share cores"
        )
    pinned = pin is not False and not short
    router = None
    for node, wanted in placed.items():
        free = list(cores_of[node])
        for w, rank, n in wanted:
            if pinned:
                ranks[w][rank] = RankCores(tuple(free[:n]), n)
                free = free[n:]
            else:  # each rank computes with its share of the node's cores
                share = max(1, len(cores_of[node]) // sum(k for _, _, k in wanted) * n)
                ranks[w][rank] = RankCores(None, share)
        if pinned and node == here:
            router = tuple(free) or None
    if pinned and here not in placed:
        router = tuple(available_cores())
    return CorePlan(ranks, router, pinned)

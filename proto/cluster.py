"""The cluster a plan is made for: nodes of GPUs and the network between them.

In YAML::

    nodes:
      - name: a100            # with count > 1 the nodes are named a100-0, a100-1, ...
        count: 2
        gpu_type: A100-80GB   # a name from planner/latency/gpus.py (the planner checks it)
        num_gpus: 8
        gpu_memory_gb: 80     # optional: default from the GPU table
        intra_node_gb_s: 300  # optional: GPU-to-GPU bandwidth inside the node, GB/s
        nic_gb_s: 25          # optional: the node's network bandwidth, GB/s (not Gbit/s)
        cost_per_gpu_hour: 3.7  # optional: default from the GPU table
    links:                    # optional: caps on the bandwidth between two nodes, GB/s
      - {a: a100-0, b: l4-0, gb_s: 1.0}

Bandwidths are in gigabytes per second, the unit KV sizes are counted in: a 100 Gbit/s
NIC is 12.5 GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from proto.schema import as_int, as_list, as_number, as_str, check_keys, load_document

DEFAULT_NIC_GB_S = 12.5  # a 100 Gbit/s NIC, common in GPU clouds


@dataclass(frozen=True)
class NodeSpec:
    name: str  # unique in the cluster; the plan places instances by it
    gpu_type: str  # a name from the planner's GPU table, e.g. "A100-80GB"
    num_gpus: int  # GPUs of gpu_type in the node
    gpu_memory_gb: float | None = None  # per GPU; None = the GPU table's
    intra_node_gb_s: float | None = None  # GPU-to-GPU bandwidth; None = the GPU table's link
    nic_gb_s: float = DEFAULT_NIC_GB_S  # each direction, shared by all GPUs of the node
    cost_per_gpu_hour: float | None = None  # None = the GPU table's default price

    def __post_init__(self) -> None:
        where = f"cluster.nodes[{self.name}]"
        as_str("cluster.nodes[].name", self.name)
        as_str(f"{where}.gpu_type", self.gpu_type)
        as_int(f"{where}.num_gpus", self.num_gpus, minimum=1)
        for field, value in (
            ("gpu_memory_gb", self.gpu_memory_gb),
            ("intra_node_gb_s", self.intra_node_gb_s),
            ("cost_per_gpu_hour", self.cost_per_gpu_hour),
        ):
            if value is not None:
                as_number(f"{where}.{field}", value, minimum=0, exclusive=field != "cost_per_gpu_hour")
        as_number(f"{where}.nic_gb_s", self.nic_gb_s, minimum=0, exclusive=True)


@dataclass(frozen=True)
class LinkSpec:
    """A cap on the bandwidth between two nodes (both directions), e.g. across racks."""

    a: str  # node name
    b: str  # node name
    gb_s: float  # 0 means the two nodes cannot exchange KV at all


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("cluster.nodes must list at least one node")
        names = [n.name for n in self.nodes]
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                raise ValueError(f"cluster.nodes[{i}].name {name!r} is used twice; names must be unique")
            seen.add(name)
        pairs: set[frozenset[str]] = set()
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                if getattr(link, end) not in seen:
                    raise ValueError(f"cluster.links[{i}].{end} {getattr(link, end)!r} is not a node name")
            if link.a == link.b:
                raise ValueError(f"cluster.links[{i}] joins node {link.a!r} to itself")
            pair = frozenset((link.a, link.b))
            if pair in pairs:
                raise ValueError(f"cluster.links[{i}] repeats the link {link.a!r}-{link.b!r}")
            pairs.add(pair)
            as_number(f"cluster.links[{i}].gb_s", link.gb_s, minimum=0)

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def num_gpus(self) -> int:
        return sum(n.num_gpus for n in self.nodes)

    @cached_property
    def _link_caps(self) -> dict[frozenset[str], float]:
        return {frozenset((link.a, link.b)): link.gb_s for link in self.links}

    def link_gb_s(self, a: str, b: str) -> float | None:
        """The cap on traffic between nodes a and b, or None when only their NICs limit it."""
        return self._link_caps.get(frozenset((a, b)))

    @staticmethod
    def from_dict(data: dict[str, Any], known_gpu_types: tuple[str, ...] | None = None) -> ClusterSpec:
        """Build from a parsed YAML mapping; gpu_type is checked against known_gpu_types."""
        check_keys("cluster", data, ("nodes",), ("links",))
        nodes: list[NodeSpec] = []
        for i, entry in enumerate(as_list("cluster.nodes", data["nodes"])):
            where = f"cluster.nodes[{i}]"
            check_keys(
                where,
                entry,
                ("name", "gpu_type", "num_gpus"),
                ("count", "gpu_memory_gb", "intra_node_gb_s", "nic_gb_s", "cost_per_gpu_hour"),
            )
            as_str(f"{where}.gpu_type", entry["gpu_type"], known_gpu_types)
            entry = dict(entry)
            count = as_int(f"{where}.count", entry.pop("count", 1), minimum=1)
            name = as_str(f"{where}.name", entry.pop("name"))
            for k in range(count):
                nodes.append(NodeSpec(name=f"{name}-{k}" if count > 1 else name, **entry))
        links = []
        for i, entry in enumerate(as_list("cluster.links", data.get("links", []))):
            links.append(LinkSpec(**check_keys(f"cluster.links[{i}]", entry, ("a", "b", "gb_s"))))
        return ClusterSpec(tuple(nodes), tuple(links))

    def to_dict(self) -> dict[str, Any]:
        nodes = []
        for n in self.nodes:
            entry = {"name": n.name, "gpu_type": n.gpu_type, "num_gpus": n.num_gpus, "nic_gb_s": n.nic_gb_s}
            for key in ("gpu_memory_gb", "intra_node_gb_s", "cost_per_gpu_hour"):
                if getattr(n, key) is not None:
                    entry[key] = getattr(n, key)
            nodes.append(entry)
        out: dict[str, Any] = {"nodes": nodes}
        if self.links:
            out["links"] = [{"a": link.a, "b": link.b, "gb_s": link.gb_s} for link in self.links]
        return out

    @staticmethod
    def load(path: str | Path, known_gpu_types: tuple[str, ...] | None = None) -> ClusterSpec:
        return ClusterSpec.from_dict(load_document(path, "cluster"), known_gpu_types)

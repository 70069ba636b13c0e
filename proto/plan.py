"""The plan file: what `tandem plan` decides and `tandem serve` and the Helm chart start.

A plan is a set of instance groups. An instance is one prefill or one decode engine of
tp x pp GPUs of one type, inside one node; a group is the instances of one role and one
(GPU type, tp, pp) configuration, with the node of each instance::

    version: 1
    model: {name: llama-2-7b, num_layers: 32, ..., dtype: float16, path: /models/llama-2-7b}
    slo: {ttft_s: 0.4, ttft_percentile: 90, tpot_s: 0.1, tpot_percentile: 90, attainment: 0.9}
    objective: goodput                     # or cost
    block_size: 16                         # KV block size the capacities were planned with
    nodes:                                 # nodes the plan uses (Helm: a worker group per gpu_type)
      - {name: h100-0, gpu_type: H100, num_gpus: 8, cost_per_gpu_hour: 6.0}
    groups:
      - role: prefill                      # prefill | decode
        gpu_type: H100
        tp: 2                              # Ray: num_gpus=tp per stage, resources {GPU_H100: tp}
        pp: 1
        count: 2
        nodes: [h100-0, h100-0]            # one entry per instance
        max_batch_size: 8                  # engine max_num_seqs
        max_batched_tokens: 8192           # engine max_num_batched_tokens
        capacity_rps: 6.1                  # requests/s one instance serves within the SLO
        latency_source: profile            # profile | roofline: where its step times came from
    routes:                                # planned prefill -> decode KV traffic
      - {prefill_node: h100-0, decode_node: h100-0, rate_rps: 12.2}
    stages: []                             # layer-split mode only (see LayerStage)
    predicted: {rate_rps: 12.2, goodput_rps: 12.2, attainment: 0.93, ttft_s: 0.31, tpot_s: 0.06}
    simulated: {...}                       # the same figures from the simulator, or null
    solver: {name: HiGHS, status: optimal, gap: 0.0, solve_time_s: 0.4, objective: 12.2}
    calibration: {rounds: 1, prefill: 1.21, decode: 1.13}   # capacity factors from simulation, or null
    warnings: []                           # what to know before trusting the figures

Layer-split mode (a model that fits no single node) fills ``stages`` instead of ``groups``:
each stage is one node holding a contiguous range of layers for one role; the stages of a
role chain layer range to layer range, like Helix's pipelines. `tandem serve` runs them as
`layer_chains`: stages of one role and one tp whose ranges tile the model, each node in one
chain, each chain a pipeline worker (a stage per node).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proto.model_spec import ModelSpec
from proto.schema import (
    Schema,
    as_int,
    as_number,
    as_str,
    build,
    check_keys,
    dump_document,
    load_document,
    plain,
)
from proto.slo import SLOSpec

PLAN_VERSION = 1
ROLES = ("prefill", "decode")
OBJECTIVES = ("goodput", "cost")
SOLVER_STATUSES = ("optimal", "time_limit", "infeasible", "no_solution")
LATENCY_SOURCES = ("roofline", "profile")


def ray_resource_name(gpu_type: str) -> str:
    """The Ray custom resource that marks GPUs of gpu_type: "A100-80GB" -> "GPU_A100_80GB"."""
    return "GPU_" + re.sub(r"[^A-Za-z0-9]", "_", gpu_type).upper()


@dataclass(frozen=True)
class PlanNode:
    name: str
    gpu_type: str
    num_gpus: int  # GPUs in the node (the plan may leave some idle)
    cost_per_gpu_hour: float = 0.0

    def __post_init__(self) -> None:
        as_str("plan.nodes[].name", self.name)
        as_str(f"plan.nodes[{self.name}].gpu_type", self.gpu_type)
        as_int(f"plan.nodes[{self.name}].num_gpus", self.num_gpus, minimum=1)
        as_number(f"plan.nodes[{self.name}].cost_per_gpu_hour", self.cost_per_gpu_hour, minimum=0)


@dataclass(frozen=True)
class InstanceGroup:
    role: str  # one of ROLES
    gpu_type: str
    tp: int  # tensor-parallel size
    pp: int  # pipeline-parallel stages (all in the instance's node)
    count: int  # instances
    nodes: tuple[str, ...]  # node of each instance, len == count
    max_batch_size: int  # the engine's max_num_seqs
    max_batched_tokens: int  # the engine's max_num_batched_tokens
    capacity_rps: float  # requests/s one instance serves within the SLO (planning estimate)
    latency_source: str = "roofline"  # one of LATENCY_SOURCES: a profile entry, or the GPU table's roofline

    def __post_init__(self) -> None:
        where = f"plan.groups[{self.role} {self.gpu_type} tp={self.tp} pp={self.pp}]"
        as_str(f"{where}.latency_source", self.latency_source, LATENCY_SOURCES)
        as_str(f"{where}.role", self.role, ROLES)
        as_str(f"{where}.gpu_type", self.gpu_type)
        for name in ("tp", "pp", "count", "max_batch_size", "max_batched_tokens"):
            as_int(f"{where}.{name}", getattr(self, name), minimum=1)
        if len(self.nodes) != self.count:
            raise ValueError(
                f"{where}.nodes must name one node per instance: {self.count} instances, {len(self.nodes)} nodes"
            )
        as_number(f"{where}.capacity_rps", self.capacity_rps, minimum=0)

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def ray_resource(self) -> str:
        return ray_resource_name(self.gpu_type)


@dataclass(frozen=True)
class Route:
    """Planned KV traffic: requests/s prefilled on prefill_node and decoded on decode_node."""

    prefill_node: str
    decode_node: str
    rate_rps: float

    def __post_init__(self) -> None:
        as_number(f"plan.routes[{self.prefill_node}->{self.decode_node}].rate_rps", self.rate_rps, minimum=0)


@dataclass(frozen=True)
class LayerStage:
    """Layer-split mode: one node runs layers [layer_start, layer_end) of one role."""

    role: str
    node: str
    gpu_type: str
    tp: int  # the node's GPUs that run this stage, tensor-parallel
    layer_start: int
    layer_end: int
    rate_rps: float  # requests/s that flow through this stage
    latency_source: str = "roofline"  # one of LATENCY_SOURCES, of the node's full-model (tp, pp=1) figures

    def __post_init__(self) -> None:
        where = f"plan.stages[{self.role} {self.node}]"
        as_str(f"{where}.latency_source", self.latency_source, LATENCY_SOURCES)
        as_str(f"{where}.role", self.role, ROLES)
        as_int(f"{where}.tp", self.tp, minimum=1)
        as_int(f"{where}.layer_start", self.layer_start, minimum=0)
        if self.layer_end <= self.layer_start:
            raise ValueError(f"{where}.layer_end ({self.layer_end}) must exceed layer_start ({self.layer_start})")


@dataclass(frozen=True)
class LayerChain:
    """Layer-split stages of one role and one tp whose ranges tile the model's layers in order:
    served as one pipeline worker, a stage per node."""

    role: str
    stages: tuple[LayerStage, ...]

    @property
    def tp(self) -> int:
        return self.stages[0].tp

    @property
    def rate_rps(self) -> float:
        """What the chain carries: its narrowest stage's planned flow."""
        return min(s.rate_rps for s in self.stages)

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers of each stage, in order (the worker's pipeline_layers)."""
        return tuple(s.layer_end - s.layer_start for s in self.stages)


def layer_chains(
    stages: tuple[LayerStage, ...], num_layers: int
) -> tuple[tuple[LayerChain, ...], tuple[LayerStage, ...]]:
    """The layer-split stages as node-disjoint chains, and the stages left in none.

    Helix routes each request through whichever stage holds its next layers, so a stage may
    feed several others (a max-flow); a pipeline worker is a fixed chain of processes, so each
    node here serves one chain. Per role, the widest chain (the largest narrowest flow) of
    one tp over the stages not yet taken, until none reaches the last layer: what a chain
    carries is its narrowest stage's planned flow, and the sum over chains is what the
    split serves as chains (less than its max-flow where that needed a stage to fan out)."""
    chains: list[LayerChain] = []
    free = sorted(stages, key=lambda s: (s.layer_start, -s.rate_rps, s.node))
    for role in ROLES:
        while True:
            best: tuple[float, list[LayerStage]] | None = None
            for tp in sorted({s.tp for s in free if s.role == role}):
                path = _widest_chain([s for s in free if s.role == role and s.tp == tp], num_layers)
                if path and (best is None or min(s.rate_rps for s in path) > best[0]):
                    best = (min(s.rate_rps for s in path), path)
            if best is None:
                break
            chains.append(LayerChain(role, tuple(best[1])))
            free = [s for s in free if all(s is not t for t in best[1])]
    return tuple(chains), tuple(free)


def _widest_chain(stages: list[LayerStage], num_layers: int) -> list[LayerStage]:
    """The chain from layer 0 to num_layers whose narrowest stage flow is largest ([] if none),
    over a DAG of layer boundaries (stages go forward)."""
    width: dict[int, float] = {0: float("inf")}
    via: dict[int, LayerStage] = {}
    for s in sorted(stages, key=lambda s: (s.layer_start, -s.rate_rps, s.node)):
        if s.layer_start in width:
            w = min(width[s.layer_start], s.rate_rps)
            if w > width.get(s.layer_end, -1.0):
                width[s.layer_end], via[s.layer_end] = w, s
    if num_layers not in via:
        return []
    path, end = [], num_layers
    while end > 0:
        path.append(via[end])
        end = via[end].layer_start
    return path[::-1]


@dataclass(frozen=True)
class Metrics:
    """Serving figures of a plan, predicted by the planner's model or measured by simulation."""

    rate_rps: float  # the arrival rate the percentiles and attainment below are at
    goodput_rps: float | None  # the highest rate at which the attainment goal holds; None: not measured
    attainment: float  # fraction of requests meeting both SLO targets at rate_rps
    ttft_s: float  # TTFT at the SLO's percentile, at rate_rps
    tpot_s: float  # TPOT at the SLO's percentile, at rate_rps

    def __post_init__(self) -> None:
        for name in ("rate_rps", "goodput_rps", "ttft_s", "tpot_s"):
            if getattr(self, name) is not None or name != "goodput_rps":
                as_number(f"metrics.{name}", getattr(self, name), minimum=0)
        as_number("metrics.attainment", self.attainment, minimum=0, maximum=1)


@dataclass(frozen=True)
class SolverInfo:
    name: str  # "HiGHS" or "PULP_CBC_CMD"
    status: str  # optimal (within gap) | time_limit (feasible, not proven) | infeasible | no_solution
    gap: float  # proven relative gap between the plan and the best bound (0 = optimal)
    solve_time_s: float
    objective: float  # goodput (req/s) or cost ($/h), per Plan.objective
    num_variables: int = 0
    num_constraints: int = 0

    def __post_init__(self) -> None:
        as_str("plan.solver.status", self.status, SOLVER_STATUSES)
        as_number("plan.solver.gap", self.gap, minimum=0)


@dataclass(frozen=True)
class Calibration:
    """How the capacity model was calibrated by the simulator (planner/simulate/calibration.py):
    every option's capacity_rps is the model's times its role's factor."""

    rounds: int  # calibrate-and-solve rounds
    prefill: float = 1.0  # simulated over modelled capacity, over all rounds
    decode: float = 1.0

    def __post_init__(self) -> None:
        as_int("plan.calibration.rounds", self.rounds, minimum=1)
        for role in ROLES:
            as_number(f"plan.calibration.{role}", getattr(self, role), minimum=0, exclusive=True)


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    slo: SLOSpec
    objective: str  # one of OBJECTIVES
    nodes: tuple[PlanNode, ...]
    groups: tuple[InstanceGroup, ...]
    routes: tuple[Route, ...]
    predicted: Metrics
    solver: SolverInfo
    simulated: Metrics | None = None
    stages: tuple[LayerStage, ...] = ()
    block_size: int = 16
    # What a reader must know before trusting the figures: a forecast below the attainment
    # goal (and the rate at which it meets it), a solve stopped at its time limit.
    warnings: tuple[str, ...] = ()
    version: int = PLAN_VERSION
    calibration: Calibration | None = None  # None: capacities straight from the model

    def __post_init__(self) -> None:
        as_str("plan.objective", self.objective, OBJECTIVES)
        if self.version != PLAN_VERSION:
            raise ValueError(f"plan.version must be {PLAN_VERSION}, got {self.version!r}")
        as_int("plan.block_size", self.block_size, minimum=1)
        for i, warning in enumerate(self.warnings):
            as_str(f"plan.warnings[{i}]", warning)
        if not self.groups and not self.stages:
            raise ValueError("plan.groups and plan.stages are both empty: the plan places nothing")
        nodes = {n.name: n for n in self.nodes}
        if len(nodes) != len(self.nodes):
            raise ValueError("plan.nodes names must be unique")
        used: Counter[str] = Counter()
        for group in self.groups:
            for name in group.nodes:
                node = nodes.get(name)
                if node is None:
                    raise ValueError(
                        f"plan.groups[{group.role} {group.gpu_type}].nodes names {name!r}, which is not in plan.nodes"
                    )
                if node.gpu_type != group.gpu_type:
                    raise ValueError(
                        f"plan.groups[{group.role} {group.gpu_type}].gpu_type does not "
                        f"match node {name!r}, which has {node.gpu_type}"
                    )
                used[name] += group.gpus_per_instance
        for stage in self.stages:
            if stage.node not in nodes:
                raise ValueError(f"plan.stages[{stage.role} {stage.node}].node is not in plan.nodes")
            used[stage.node] += stage.tp
        for name, num in used.items():
            if num > nodes[name].num_gpus:
                raise ValueError(f"plan places {num} GPUs on node {name!r}, which has {nodes[name].num_gpus}")
        for route in self.routes:
            for end in (route.prefill_node, route.decode_node):
                if end not in nodes:
                    raise ValueError(f"plan.routes names node {end!r}, which is not in plan.nodes")

    @property
    def num_gpus(self) -> int:
        """GPUs the plan runs instances on."""
        return sum(g.count * g.gpus_per_instance for g in self.groups) + sum(s.tp for s in self.stages)

    @property
    def cost_per_hour(self) -> float:
        price = {n.name: n.cost_per_gpu_hour for n in self.nodes}
        return sum(price[name] * g.gpus_per_instance for g in self.groups for name in g.nodes) + sum(
            price[s.node] * s.tp for s in self.stages
        )

    def num_instances(self, role: str) -> int:
        return sum(g.count for g in self.groups if g.role == role)

    def check_servable(self) -> None:
        """Refuse what `tandem serve` cannot run, naming it. Instances of any tp and pp are
        served (pp stages of tp ranks each); layer-split stages as their layer_chains, which
        need a chain for each role."""
        if not self.stages:
            return
        chains, _ = layer_chains(self.stages, self.model.num_layers)
        for role in ROLES:
            if not any(c.role == role for c in chains):
                raise ValueError(
                    f"plan.stages: no {role} stages of one tp chain from layer 0 to layer "
                    f"{self.model.num_layers} (their ranges: "
                    + (
                        ", ".join(
                            f"{s.node} [{s.layer_start}, {s.layer_end}) tp={s.tp}"
                            for s in self.stages
                            if s.role == role
                        )
                        or "none"
                    )
                    + "); tandem serve runs each such chain as a pipeline worker"
                )

    def gpus_by_type(self) -> dict[str, int]:
        """GPUs used per GPU type: the Helm chart's worker groups."""
        out: Counter[str] = Counter()
        for g in self.groups:
            out[g.gpu_type] += g.count * g.gpus_per_instance
        for s in self.stages:
            out[s.gpu_type] += s.tp
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        out = plain(asdict(self))
        out["model"] = self.model.to_dict()
        return {"version": out.pop("version"), **out}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Plan:
        check_keys(
            "plan",
            data,
            ("model", "slo", "objective", "nodes", "groups", "routes", "predicted", "solver"),
            ("simulated", "stages", "block_size", "warnings", "version", "calibration"),
        )

        def each(key: str, cls: type[Schema]) -> tuple[Schema, ...]:
            items = data.get(key) or []
            if not isinstance(items, list):
                raise ValueError(f"plan.{key} must be a list")
            return tuple(build(cls, f"plan.{key}[{i}]", item) for i, item in enumerate(items))

        simulated = data.get("simulated")
        calibration = data.get("calibration")
        return build(
            Plan,
            "plan",
            data,
            calibration=None if calibration is None else build(Calibration, "plan.calibration", calibration),
            model=ModelSpec.from_dict(data["model"]),
            slo=SLOSpec.from_dict(data["slo"]),
            nodes=each("nodes", PlanNode),
            groups=each("groups", InstanceGroup),
            routes=each("routes", Route),
            stages=each("stages", LayerStage),
            predicted=build(Metrics, "plan.predicted", data["predicted"]),
            simulated=None if simulated is None else build(Metrics, "plan.simulated", simulated),
            solver=build(SolverInfo, "plan.solver", data["solver"]),
        )

    def save(self, path: str | Path) -> None:
        """YAML, or JSON when path ends in .json."""
        dump_document(self.to_dict(), path)

    @staticmethod
    def load(path: str | Path) -> Plan:
        return Plan.from_dict(load_document(path, "plan"))

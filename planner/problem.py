"""The planning problem: inputs, the options and limits prepared from them, the MILP's placement.

    PlanInputs --prepare()--> Problem (hardware, workload stats, options, KV traffic limits)
               --place()--> Placement (instances per node, routes)

A Problem is what the MILP, exhaustive enumeration, the DistServe-style baseline and the
simulator all take, so that they are compared on the same inputs. planner/evaluate.py
simulates a placement and calibrates it; planner/planning.py turns it into a Plan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from planner.latency.gpus import PROFILE_FIX, NodeHardware, node_hardware
from planner.latency.roofline import LatencyTable, Profile
from planner.simulate.workload import Trace, WorkloadSpec, load_trace
from planner.solve.capacity import (
    PARALLEL_SIZES,
    InstanceOption,
    WorkloadStats,
    enumerate_options,
    fits,
    has_latency,
    pooled,
    prune_dominated,
)
from planner.solve.diagnose import does_not_fit_message, slo_unreachable_message, unpaired_message
from planner.solve.milp import Placement, compatible_options, solve_placement
from planner.solve.network import Traffic, traffic_limits
from planner.solve.predict import num_prefill_instances
from planner.solve.solver import SolveOptions
from proto.cluster import ClusterSpec
from proto.model_spec import ModelSpec
from proto.plan import SolverInfo
from proto.schema import as_str
from proto.slo import SLOSpec

NUM_STAT_SAMPLES = 400  # workload samples behind the queueing model's expectations
TRANSFER_TPOT_SHARE = 0.25
# Prefill pool sizes the MILP is solved for (place()); past 16 a pool's gain barely grows.
POOL_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass(frozen=True)
class PlanInputs:
    cluster: ClusterSpec
    model: ModelSpec
    workload: WorkloadSpec
    slo: SLOSpec
    objective: str = "goodput"  # goodput | cost
    target_rps: float | None = None  # cost objective: the rate to serve (default: the workload's)
    profile: Profile | None = None
    block_size: int = 16
    max_pp: int = max(PARALLEL_SIZES)  # pipeline stages per instance at most

    def __post_init__(self) -> None:
        as_str("objective", self.objective, ("goodput", "cost"))
        if self.max_pp not in PARALLEL_SIZES:
            raise ValueError(f"max_pp must be one of {PARALLEL_SIZES}, got {self.max_pp}")


@dataclass(frozen=True)
class Problem:
    inputs: PlanInputs
    hardware: dict[str, NodeHardware]  # node name -> its GPUs
    latency: LatencyTable
    stats: WorkloadStats
    options: list[InstanceOption]  # every option with positive capacity
    traffic: Traffic
    trace: Trace | None

    @property
    def target_rps(self) -> float:
        return self.inputs.target_rps or self.inputs.workload.base_rate_rps(self.trace)


def workload_stats(workload: WorkloadSpec, trace: Trace | None, seed: int = 0) -> WorkloadStats:
    rng = np.random.default_rng(seed)
    cv2 = workload.arrival_cv2(trace)
    if trace is not None:
        rows = rng.choice(len(trace.input_tokens), min(NUM_STAT_SAMPLES, len(trace.input_tokens)), replace=False)
        longest = int((trace.input_tokens + trace.output_tokens).max())
        return WorkloadStats(trace.input_tokens[rows], trace.output_tokens[rows], longest, cv2)
    sample = workload.sample(NUM_STAT_SAMPLES * 25, seed=seed)
    longest = int((sample.input_tokens + sample.output_tokens).max())
    return WorkloadStats(sample.input_tokens[:NUM_STAT_SAMPLES], sample.output_tokens[:NUM_STAT_SAMPLES], longest, cv2)


def kv_traffic(inputs: PlanInputs, hardware: dict[str, NodeHardware], stats: WorkloadStats) -> Traffic:
    """KV limits, with paths closed whose transfer would spoil short requests' TPOT.

    A transfer of d seconds adds d / (outputs - 1) to a request's TPOT. A path stays open
    when a long prompt's transfer (the TTFT percentile's prompt) adds at most
    TRANSFER_TPOT_SHARE of the TPOT target to a short request (the output length below
    which half of the TPOT percentile's allowed misses lie).
    """
    slo = inputs.slo
    kv_per_token = inputs.model.kv_bytes_per_token
    short_steps = max(float(np.percentile(stats.output_tokens, (100 - slo.tpot_percentile) / 2)) - 1, 1.0)
    return traffic_limits(
        inputs.cluster,
        hardware,
        float(stats.input_tokens.mean()) * kv_per_token,
        float(np.percentile(stats.input_tokens, slo.ttft_percentile)) * kv_per_token,
        TRANSFER_TPOT_SHARE * slo.tpot_s * short_steps,
    )


def read_inputs(inputs: PlanInputs) -> tuple[dict[str, NodeHardware], Trace | None, WorkloadStats, LatencyTable]:
    """What every mode needs: node hardware, the trace (if any), workload stats, latencies."""
    hardware = {n.name: node_hardware(n) for n in inputs.cluster.nodes}
    profiled = {e.gpu_type for e in inputs.profile.entries} if inputs.profile else set()
    for i, n in enumerate(inputs.cluster.nodes):
        if not hardware[n.name].gpu.has_roofline and n.gpu_type not in profiled:
            raise ValueError(
                f"cluster.nodes[{i}] ({n.name}) has gpu_type {n.gpu_type}, which the roofline has no "
                f"datasheet for, and no profile entry has gpu_type {n.gpu_type}: {PROFILE_FIX}"
            )
    trace = load_trace(inputs.workload.trace) if inputs.workload.trace else None
    latency = LatencyTable(inputs.model, inputs.profile, (n.gpu_type for n in inputs.cluster.nodes))
    return hardware, trace, workload_stats(inputs.workload, trace), latency


def prepare(inputs: PlanInputs) -> Problem:
    """Options and limits for the inputs; ValueError when nothing fits or meets the SLO."""
    hardware, trace, stats, latency = read_inputs(inputs)
    num_gpus = {n.name: n.num_gpus for n in inputs.cluster.nodes}
    max_gpus: dict[NodeHardware, int] = defaultdict(int)
    for n in inputs.cluster.nodes:
        max_gpus[hardware[n.name]] = max(max_gpus[hardware[n.name]], n.num_gpus)
    options = enumerate_options(
        inputs.model, dict(max_gpus), latency, stats, inputs.slo, inputs.block_size, inputs.max_pp
    )
    missing = [role for role in ("prefill", "decode") if not any(o.role == role for o in options)]
    if missing:
        fitting = [
            (tp * pp, pp, tp, hw.gpu.name)
            for hw, g in max_gpus.items()
            for tp in PARALLEL_SIZES
            for pp in PARALLEL_SIZES
            if tp * pp <= g and fits(inputs.model, hw, tp, pp, stats.max_tokens) and has_latency(latency, hw, tp, pp)
        ]
        if not fitting:
            raise ValueError(does_not_fit_message(inputs.model, hardware, num_gpus, stats.max_tokens))
        if all(pp > inputs.max_pp for _, pp, _, _ in fitting):
            _, pp, tp, gpu = min(fitting)
            raise ValueError(
                f"model {inputs.model.name} fits an instance on this cluster only with pipeline "
                f"parallelism (e.g. {gpu} tp={tp} pp={pp}), and max_pp is {inputs.max_pp}: "
                f"plan with --max-pp {pp} (tandem serve runs it), or with --layer-split"
            )
        raise ValueError(
            slo_unreachable_message(
                inputs.model, hardware, num_gpus, latency, stats, inputs.slo, missing, inputs.max_pp
            )
        )
    traffic = kv_traffic(inputs, hardware, stats)
    return Problem(inputs, hardware, latency, stats, options, traffic, trace)


def place(
    problem: Problem, solve_options: SolveOptions, progress: Callable[[str], None] | None = None
) -> tuple[Placement, list[InstanceOption]]:
    """Solve the MILP over the non-dominated options; ValueError when it has no answer.

    Prefill capacities depend on how many prefill instances pool their queues (capacity.pooled),
    which the MILP decides: it is solved once per assumed pool size in POOL_SIZES (and for
    each pool size a solution has), a solution counts only when it places at least as many
    prefill instances as its capacities assume, and the best one wins."""
    inputs = problem.inputs
    target = problem.target_rps if inputs.objective == "cost" else None
    best: tuple[Placement, list[InstanceOption]] | None = None
    first: tuple[Placement, list[InstanceOption]] | None = None
    pools = [k for k in POOL_SIZES if k <= inputs.cluster.num_gpus]
    for pool in pools:
        options = prune_dominated(pooled(problem.options, problem.stats, inputs.slo, pool))
        placement = solve_placement(
            inputs.cluster,
            problem.hardware,
            options,
            problem.traffic,
            inputs.objective,
            target,
            solve_options,
            progress,
        )
        first = first or (placement, options)
        found = num_prefill_instances(placement, options)
        if placement.solver.status not in ("optimal", "time_limit") or placement.rate_rps <= 0 or found < pool:
            continue
        if found not in pools:  # solve again for the pool it has, so that its capacities are its own
            pools.append(found)
        if best is None or _better(placement, best[0], inputs.objective):
            best = (placement, options)
    if best is not None:
        return best
    assert first is not None  # POOL_SIZES starts at 1, which any cluster has
    placement, options = first
    if placement.solver.status == "no_solution" or placement.solver.status == "time_limit":
        raise ValueError(stopped_message(solve_options, "a placement that serves requests"))
    if inputs.objective == "cost" and placement.solver.status == "infeasible":
        most, _ = place(replace(problem, inputs=replace(inputs, objective="goodput")), solve_options)
        raise ValueError(
            f"target rate {target:g} req/s is out of reach: the most this cluster serves "
            f"within {inputs.slo.describe()} is {most.rate_rps:.2f} req/s"
        )
    hosts = compatible_options(inputs.cluster, problem.hardware, options)
    raise ValueError(unpaired_message(inputs.cluster, inputs.model, options, hosts, problem.traffic))


def _better(a: Placement, b: Placement, objective: str) -> bool:
    """Goodput: more requests/s; cost: a lower price (each solve meets the target)."""
    return a.rate_rps > b.rate_rps if objective == "goodput" else a.solver.objective < b.solver.objective


def stopped_message(solve_options: SolveOptions, what: str) -> str:
    limit = solve_options.time_limit_s
    return (
        f"the solver stopped at its time limit ({limit:g} s) before it found {what}; "
        f"raise --time-limit (e.g. --time-limit {limit * 4:g})"
    )


def time_limit_warning(solver: SolverInfo, solve_options: SolveOptions, objective: str) -> str | None:
    """A plan from a solve that hit its time limit is the best found, not proven best."""
    if solver.status != "time_limit":
        return None
    better = "serve" if objective == "goodput" else "cost"
    more = "more" if objective == "goodput" else "less"
    return (
        f"the solver stopped at its time limit ({solve_options.time_limit_s:g} s) with a proven gap of "
        f"{solver.gap:.2%}: a better plan may {better} up to {solver.gap:.2%} {more}; raise --time-limit "
        f"(or --gap) to prove it"
    )

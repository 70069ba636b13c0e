"""From inputs to a plan: prepare the options, solve the MILP, forecast, simulate, write.

    PlanInputs --prepare()--> Problem (hardware, workload stats, options, KV traffic limits)
               --solve_placement()--> Placement (instances per node, routes)
               --predict() + simulate()--> Plan (proto/plan.py)

A Problem is what the MILP, exhaustive enumeration, the DistServe-style baseline and the
simulator all take, so that they are compared on the same inputs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from planner.calibration import RoleCalibration, calibrate_role, calibrated
from planner.capacity import (
    PARALLEL_SIZES,
    InstanceOption,
    WorkloadStats,
    enumerate_options,
    fits,
    has_latency,
    pooled,
    prune_dominated,
)
from planner.diagnose import does_not_fit_message, slo_unreachable_message, unpaired_message
from planner.gpus import PROFILE_FIX, NodeHardware, node_hardware
from planner.latency import LatencyTable, Profile
from planner.milp import Placement, compatible_options, solve_placement
from planner.network import Traffic, traffic_limits
from planner.predict import attainment, goal_warning, num_prefill_instances, predict
from planner.simulator import SimResult, Simulator
from planner.solver import SolveOptions
from planner.workload import Requests, Trace, WorkloadSpec, load_trace
from proto.cluster import ClusterSpec
from proto.model_spec import ModelSpec
from proto.plan import ROLES, Calibration, InstanceGroup, Metrics, Plan, PlanNode, Route, SolverInfo
from proto.schema import as_str
from proto.slo import SLOSpec

NUM_STAT_SAMPLES = 400  # workload samples behind the queueing model's expectations
TRANSFER_TPOT_SHARE = 0.25
SIM_LIFETIMES = 3  # warm-up, counted window, cool-down
GOODPUT_SEARCH_STEPS = 6  # bisection steps of the simulated goodput, after the bracket
# Calibration simulates other requests (another seed) than the plan's simulated figures,
# which therefore check the calibrated forecast on requests it was not fitted to.
CALIBRATION_SEED = 1
CALIBRATION_ROUNDS = 3  # at most, by default: calibrate-and-solve rounds (planner/calibration.py)
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
    max_pp: int = max(PARALLEL_SIZES)  # pipeline stages at most (tandem plan defaults to 1: see cli)

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


def _read(inputs: PlanInputs) -> tuple[dict[str, NodeHardware], Trace | None, WorkloadStats, LatencyTable]:
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
    hardware, trace, stats, latency = _read(inputs)
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
                f"tandem serve does not run pipeline stages yet; plan with --max-pp {pp} "
                f"to see such a plan anyway, or with --layer-split"
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


def simulator(problem: Problem, placement: Placement, options: list[InstanceOption]) -> Simulator:
    instances = [(n, options[i]) for (n, i), c in sorted(placement.counts.items()) for _ in range(c)]
    return Simulator(
        instances,
        placement.routes,
        problem.inputs.cluster,
        problem.hardware,
        problem.inputs.model,
        problem.inputs.block_size,
    )


def _sim_requests(problem: Problem, rate_rps: float, num_requests: int, seed: int) -> tuple[Requests, tuple]:
    return run_requests(
        problem.inputs.workload, problem.trace, problem.stats, problem.inputs.slo, rate_rps, num_requests, seed
    )


def run_requests(
    workload: WorkloadSpec,
    trace: Trace | None,
    stats: WorkloadStats,
    slo: SLOSpec,
    rate_rps: float,
    num_requests: int,
    seed: int,
) -> tuple[Requests, tuple[float, float]]:
    """The requests a simulation at rate_rps runs, and the window of arrival times it counts
    (benchmarks/closed_loop.py replays the same requests against a server).

    At least num_requests, and enough for a warm-up, a counted window and a cool-down of
    one request lifetime each (a decode lifetime at the TPOT target can be many seconds, and
    a short run at a high rate would never load the decode instances)."""
    lifetime_s = slo.ttft_s + stats.mean_decode_steps * slo.tpot_s
    n = max(num_requests, math.ceil(rate_rps * SIM_LIFETIMES * lifetime_s))
    requests = workload.sample(n, rate_rps=rate_rps, seed=seed, trace=trace)
    end_s = float(requests.arrival_s[-1])
    return requests, (lifetime_s, end_s - lifetime_s)


def simulate(
    problem: Problem,
    placement: Placement,
    options: list[InstanceOption],
    rate_rps: float,
    num_requests: int,
    seed: int = 0,
) -> SimResult:
    requests, window = _sim_requests(problem, rate_rps, num_requests, seed)
    return simulator(problem, placement, options).run(requests, window)


def simulated_goodput(
    problem: Problem,
    placement: Placement,
    options: list[InstanceOption],
    num_requests: int,
    num_steps: int = GOODPUT_SEARCH_STEPS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> float:
    """Highest rate whose simulated attainment meets the goal (bisection, DistServe-style);
    progress hears each simulation's rate and attainment (each can take seconds)."""
    slo = problem.inputs.slo
    sim = simulator(problem, placement, options)
    say = progress or (lambda _msg: None)

    def ok(rate: float) -> bool:
        requests, window = _sim_requests(problem, rate, num_requests, seed)
        attainment = sim.run(requests, window).attainment(slo)
        meets = attainment >= slo.attainment
        say(
            f"  goodput search: {rate:.2f} req/s -> attainment {attainment:.3f} "
            f"({'meets' if meets else 'misses'} the goal)"
        )
        return meets

    lo, hi = 0.0, placement.rate_rps
    while ok(hi):
        lo, hi = hi, hi * 1.5
    for _ in range(num_steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class Calibrated:
    """What calibrate() settles on: the placement, its options at calibrated capacities, and
    what the simulator found."""

    problem: Problem  # with every option's capacity calibrated by `calibration`'s factors
    placement: Placement
    options: list[InstanceOption]
    calibration: Calibration
    simulated_goodput_rps: float  # of the placement, both roles together


def calibrate(
    problem: Problem,
    placement: Placement,
    options: list[InstanceOption],
    solve_options: SolveOptions,
    num_requests: int,
    max_rounds: int,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Calibrated:
    """The MILP iterating with the simulator (planner/calibration.py), at most max_rounds rounds.

    A round takes the MILP's latest placement and simulates it: each role alone gives a
    factor per role (simulated over modelled capacity), whose capacities set the routes of
    the placement's own instances; the goodput search then simulates both roles together,
    and its goodput over that rate is one more factor for both roles (their interaction:
    a request's TTFT holds its wait for prefill and for decode room). The MILP solves
    again with the factors for the next placement. The rounds stop when the MILP proposes
    a placement already simulated; the one with the best simulated goodput (cost: the
    cheapest serving the target) wins, so a plan's capacities are always those simulated
    for its own placement."""
    say = progress or (lambda _msg: None)
    inputs = problem.inputs
    model_options = problem.options  # the queueing model's own capacities
    candidates: list[Calibrated] = []
    seen = set()
    for k in range(max_rounds):
        seen.add(_signature(placement, options))
        sim = simulator(problem, placement, options)
        sample = partial(_sim_requests, problem, num_requests=num_requests, seed=seed)
        found: dict[str, RoleCalibration] = {}
        for role in ROLES:
            found[role] = calibrate_role(
                sim,
                placement,
                options,
                role,
                inputs.slo,
                sample,
                progress,
            )
            if found[role].modelled_rps > 0 and found[role].simulated_rps <= 0:
                raise ValueError(
                    f"simulated alone, the placement's {role} instances meet the SLO percentiles at no "
                    f"rate, while the capacity model gives them {found[role].modelled_rps:.2f} req/s; "
                    f"plan with --calibrate-rounds 0 to see the model's plan"
                )
        alone = calibrated(options, {role: c.factor for role, c in found.items()})
        routed = _fixed(problem, placement, alone, solve_options)
        say(
            f"calibration round {k + 1}: "
            + "; ".join(f"{r} alone {c.simulated_rps:.2f} req/s (model {c.modelled_rps:.2f})" for r, c in found.items())
            + f"; together at most {routed.rate_rps:.2f} req/s"
        )
        goodput = simulated_goodput(problem, routed, alone, num_requests, seed=seed, progress=progress)
        joint = goodput / routed.rate_rps if routed.rate_rps > 0 else 1.0
        own = calibrated(alone, dict.fromkeys(ROLES, joint))
        factors = {role: next((o.calibration for o in own if o.role == role), 1.0) for role in ROLES}
        candidates.append(
            Calibrated(
                replace(problem, options=calibrated(model_options, factors)),
                _fixed(problem, placement, own, solve_options),
                own,
                Calibration(k + 1, round(factors["prefill"], 4), round(factors["decode"], 4)),
                goodput,
            )
        )
        say(
            f"  simulated goodput {goodput:.2f} req/s: factors prefill x{factors['prefill']:.3f}, "
            f"decode x{factors['decode']:.3f} the model's"
        )
        problem = candidates[-1].problem
        placement, options = place(problem, solve_options, progress)
        again = _signature(placement, options) in seen
        say(
            f"  solved again with these factors: {placement.rate_rps:.2f} req/s"
            + (", a placement already simulated: converged" if again else "")
        )
        if again:
            break
    target = problem.target_rps if inputs.objective == "cost" else 0.0
    eligible = [c for c in candidates if c.simulated_goodput_rps > 0 and c.simulated_goodput_rps >= target]
    best = max(eligible or candidates, key=lambda c: c.simulated_goodput_rps)
    if inputs.objective == "cost" and eligible:
        best = min(eligible, key=lambda c: c.placement.solver.objective)
    return replace(best, calibration=replace(best.calibration, rounds=len(candidates)))


def _fixed(
    problem: Problem, placement: Placement, options: list[InstanceOption], solve_options: SolveOptions
) -> Placement:
    """The placement's own instances at these options' capacities, routes solved for the
    most they serve; its solver info is the placement's (the MILP that chose it), with the
    objective of these capacities."""
    inputs = problem.inputs
    routed = solve_placement(
        inputs.cluster,
        problem.hardware,
        options,
        problem.traffic,
        "goodput",
        None,
        solve_options,
        fixed_counts=placement.counts,
    )
    cost = sum(c * options[i].cost_per_hour for (_, i), c in routed.counts.items())
    objective = routed.rate_rps if inputs.objective == "goodput" else cost
    return replace(routed, solver=replace(placement.solver, objective=round(objective, 4)))


def _signature(placement: Placement, options: list[InstanceOption]) -> frozenset:
    """A placement's instances, independent of how its options list is numbered."""
    counts: dict[tuple, int] = defaultdict(int)
    for (n, i), c in placement.counts.items():
        o = options[i]
        counts[n, o.role, o.gpu_type, o.tp, o.pp] += c
    return frozenset(counts.items())


def evaluation_rate(problem: Problem, placement: Placement) -> float:
    """The rate a plan's figures are quoted at: its goodput, or the cost objective's target."""
    return problem.target_rps if problem.inputs.objective == "cost" else placement.rate_rps


def plan_nodes(cluster: ClusterSpec, hardware: dict[str, NodeHardware], used: set[str]) -> tuple[PlanNode, ...]:
    """The used nodes, in cluster order, with the price the plan was costed at."""
    return tuple(
        PlanNode(n.name, n.gpu_type, n.num_gpus, hardware[n.name].cost_per_gpu_hour)
        for n in cluster.nodes
        if n.name in used
    )


def to_plan(
    problem: Problem,
    placement: Placement,
    options: list[InstanceOption],
    predicted: Metrics,
    simulated: Metrics | None,
    warnings: tuple[str, ...] = (),
    calibration: Calibration | None = None,
) -> Plan:
    inputs = problem.inputs
    by_option: dict[int, list[str]] = defaultdict(list)
    for (n, i), c in sorted(placement.counts.items()):
        by_option[i].extend([n] * c)
    groups = tuple(
        InstanceGroup(
            role=o.role,
            gpu_type=o.gpu_type,
            tp=o.tp,
            pp=o.pp,
            count=len(nodes),
            nodes=tuple(nodes),
            max_batch_size=o.max_batch_size,
            max_batched_tokens=o.max_batched_tokens,
            capacity_rps=round(o.capacity_rps, 4),
            latency_source=o.coefficients.source,
        )
        for i, nodes in sorted(by_option.items(), key=lambda kv: (options[kv[0]].role != "prefill", kv[0]))
        for o in [options[i]]
    )
    nodes = plan_nodes(inputs.cluster, problem.hardware, {n for (n, _) in placement.counts})
    routes = tuple(Route(p, d, round(r, 4)) for (p, d), r in sorted(placement.routes.items()))
    return Plan(
        model=inputs.model,
        slo=inputs.slo,
        objective=inputs.objective,
        nodes=nodes,
        groups=groups,
        routes=routes,
        predicted=predicted,
        simulated=simulated,
        solver=placement.solver,
        block_size=inputs.block_size,
        warnings=warnings,
        calibration=calibration,
    )


def make_plan(
    inputs: PlanInputs,
    solve_options: SolveOptions,
    num_sim_requests: int = 2000,
    search_goodput: bool = True,
    progress: Callable[[str], None] | None = None,
    calibration_rounds: int = CALIBRATION_ROUNDS,
) -> Plan:
    """The plan for inputs; with simulation on (num_sim_requests > 0), capacities are first
    calibrated by the simulator in at most calibration_rounds rounds (0: the model's own)."""
    say = progress or (lambda _msg: None)
    say(
        f"planning {inputs.model.name} on {len(inputs.cluster.nodes)} nodes / {inputs.cluster.num_gpus} GPUs "
        f"for {inputs.slo.describe()}"
    )
    problem = prepare(inputs)
    say(f"latency model and SLO capacities: {len(problem.options)} instance options")
    placement, options = place(problem, solve_options, progress)
    s = placement.solver
    say(
        f"MILP ({s.name}): {s.status}, gap {s.gap:.2%}, {s.solve_time_s:.1f} s, "
        f"{s.num_variables} variables, {s.num_constraints} constraints: {placement.rate_rps:.2f} req/s"
    )
    calibration = None
    if num_sim_requests and calibration_rounds:
        say(f"calibrating capacities by simulation: at most {calibration_rounds} round(s)")
        found = calibrate(
            problem,
            placement,
            options,
            solve_options,
            num_sim_requests,
            calibration_rounds,
            seed=CALIBRATION_SEED,
            progress=progress,
        )
        problem, placement, options, calibration = found.problem, found.placement, found.options, found.calibration
    rate = evaluation_rate(problem, placement)
    predicted = predict(placement, options, problem.stats, inputs.slo, rate)
    warnings = _warn(
        say,
        time_limit_warning(placement.solver, solve_options, inputs.objective),
        goal_warning(
            predicted,
            inputs.slo,
            lambda r: attainment(placement, options, problem.stats, inputs.slo, r),
            inputs.objective,
        ),
    )
    simulated = None
    if num_sim_requests:
        say(
            f"simulating at {rate:.2f} req/s: {num_sim_requests} requests or more, for "
            f"{SIM_LIFETIMES} request lifetimes"
        )
        result = simulate(problem, placement, options, rate, num_sim_requests)
        goodput = None
        if search_goodput:
            say(
                f"searching the simulated goodput: simulations from {placement.rate_rps:.2f} req/s up until "
                f"the goal fails, then {GOODPUT_SEARCH_STEPS} bisection steps"
            )
            goodput = simulated_goodput(problem, placement, options, num_sim_requests, progress=progress)
        simulated = result.metrics(inputs.slo, rate, goodput)
    return to_plan(problem, placement, options, predicted, simulated, warnings, calibration)


def _warn(say: Callable[[str], None], *warnings: str | None) -> tuple[str, ...]:
    """The warnings that apply, each said on the progress channel as it is found."""
    found = tuple(w for w in warnings if w)
    for w in found:
        say(f"warning: {w}")
    return found


def make_layer_plan(
    inputs: PlanInputs, solve_options: SolveOptions, progress: Callable[[str], None] | None = None
) -> Plan:
    """Layer-split mode (planner/layer_split.py): layer ranges over nodes, goodput only."""
    from planner.layer_split import predict_split, solve_layer_split, split_attainment

    if inputs.objective != "goodput":
        raise ValueError("objective must be goodput with --layer-split (layer-split plans maximise goodput)")
    say = progress or (lambda _msg: None)
    hardware, _, stats, latency = _read(inputs)
    say(
        f"layer-split planning of {inputs.model.name} ({inputs.model.num_layers} layers) over "
        f"{len(inputs.cluster.nodes)} nodes"
    )
    split = solve_layer_split(
        inputs.cluster, hardware, inputs.model, latency, stats, inputs.slo, inputs.block_size, solve_options, progress
    )
    if split.solver.status == "no_solution" or (split.solver.status == "time_limit" and not split.stages):
        raise ValueError(stopped_message(solve_options, "a layer split that serves requests"))
    if split.goodput_rps <= 0:
        raise ValueError(
            f"no layer split serves requests within {inputs.slo.describe()}: the nodes cannot "
            f"hold the model's layers for both prefill and decode, or no stage meets its share "
            f"of the SLO (solver: {split.solver.status})"
        )
    nodes = plan_nodes(inputs.cluster, hardware, {s.node for s in split.stages})
    predicted = predict_split(split, hardware, inputs.model, latency, stats, inputs.slo)
    warnings = _warn(
        say,
        time_limit_warning(split.solver, solve_options, "goodput"),
        goal_warning(
            predicted,
            inputs.slo,
            lambda r: split_attainment(split, hardware, inputs.model, latency, stats, inputs.slo, r),
            "goodput",
        ),
    )
    return Plan(
        model=inputs.model,
        slo=inputs.slo,
        objective="goodput",
        nodes=nodes,
        groups=(),
        routes=(),
        stages=split.stages,
        predicted=predicted,
        simulated=None,
        solver=split.solver,
        block_size=inputs.block_size,
        warnings=warnings,
    )

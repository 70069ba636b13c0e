"""From inputs to a plan: prepare, solve the MILP, calibrate, forecast, simulate, write.

PlanInputs --prepare()--> Problem --place()--> Placement (planner/problem.py)
           --calibrate(), predict() + simulate()--> Plan (proto/plan.py)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

from planner.evaluate import GOODPUT_SEARCH_STEPS, SIM_LIFETIMES, calibrate, simulate, simulated_goodput
from planner.latency.gpus import NodeHardware
from planner.problem import PlanInputs, Problem, place, prepare, read_inputs, stopped_message, time_limit_warning
from planner.solve.capacity import (
    InstanceOption,
)
from planner.solve.milp import Placement
from planner.solve.predict import ATTAINMENT_SHOWN, attainment, goal_warning, predict
from planner.solve.solver import SolveOptions
from proto.cluster import ClusterSpec
from proto.plan import Calibration, InstanceGroup, LayerStage, Metrics, Plan, PlanNode, Route, layer_chains
from proto.slo import SLOSpec

# Calibration simulates other requests (another seed) than the plan's simulated figures,
# which therefore check the calibrated forecast on requests it was not fitted to.
CALIBRATION_SEED = 1
CALIBRATION_ROUNDS = 3  # at most, by default: calibrate-and-solve rounds (planner/simulate/calibration.py)


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
        warnings += _warn(say, simulation_warning(simulated, inputs.slo, calibration is not None))
    return to_plan(problem, placement, options, predicted, simulated, warnings, calibration)


def simulation_warning(simulated: Metrics, slo: SLOSpec, calibrated: bool) -> str | None:
    """What to say when the check's simulation misses the attainment goal at the plan's rate."""
    if simulated.attainment >= slo.attainment - ATTAINMENT_SHOWN:
        return None
    head = (
        f"the simulation attains {simulated.attainment:.3f} at the planned {simulated.rate_rps:.2f} req/s, "
        f"below the goal {slo.attainment:.3f}"
    )
    if simulated.goodput_rps is not None and simulated.goodput_rps > 0:
        head += (
            f"; it meets the goal up to {simulated.goodput_rps:.2f} req/s "
            f"({simulated.goodput_rps / simulated.rate_rps:.0%} of the plan): serve at most that"
        )
    why = (
        "the calibration's simulations (other requests) met it there: more --sim-requests narrow the gap"
        if calibrated
        else "the queueing model is optimistic here: calibrate it (--calibrate-rounds)"
    )
    return f"{head}; {why}"


def chain_idle_nodes(split, inputs: PlanInputs, hardware, stats, latency, solve_options: SolveOptions, say):
    """The split with the nodes its chains leave idle planned again, on their own, into more
    chains (their new ranges counted beside what the chains carry), while that adds goodput."""
    from planner.solve.layer_split import LayerSplit, solve_layer_split

    num_layers = inputs.model.num_layers
    while True:
        chains, idle = layer_chains(split.stages, num_layers)
        if not idle:
            return split
        carried = carried_per_role(chains)
        served = min(carried.values())
        names = {s.node for s in idle}
        spare = replace(inputs.cluster, nodes=tuple(n for n in inputs.cluster.nodes if n.name in names), links=())
        more = solve_layer_split(
            spare, hardware, inputs.model, latency, stats, inputs.slo, inputs.block_size, solve_options, carried=carried
        )
        chained = tuple(s for c in chains for s in c.stages)
        candidate = LayerSplit(chained + more.stages, split.goodput_rps, split.solver)
        now, _ = chained_goodput(candidate.stages, num_layers, math.inf)
        if now <= served * (1 + 1e-6):
            return split
        say(f"  {len(idle)} stage(s) in no chain planned again on their own: the chains carry {now:.2f} req/s")
        split = candidate


def carried_per_role(chains) -> dict[str, float]:
    """The rate a split's chains carry, per role (what is served is the smaller)."""
    return {role: sum(c.rate_rps for c in chains if c.role == role) for role in ("prefill", "decode")}


def chained_goodput(stages: tuple[LayerStage, ...], num_layers: int, max_flow_rps: float) -> tuple[float, str | None]:
    """What a layer split serves as node-disjoint chains (proto.plan.layer_chains, how tandem
    serve runs it), and what to say when that is less than its max-flow."""
    chains, idle = layer_chains(stages, num_layers)
    served = min(carried_per_role(chains).values())
    if served >= max_flow_rps - 1e-3:  # the plan's stage rates are rounded to 1e-4
        return max_flow_rps, None
    return served, (
        f"tandem serve runs a layer split as node-disjoint chains of stages (a pipeline worker each): "
        f"{len(chains)} chains carry {served:.2f} of the {max_flow_rps:.2f} req/s that the max-flow routes "
        f"through stages feeding several others"
        + (f"; {len(idle)} stage(s) join no chain and stay idle ({', '.join(s.node for s in idle)})" if idle else "")
        + "; the forecast is for the chains"
    )


def _warn(say: Callable[[str], None], *warnings: str | None) -> tuple[str, ...]:
    """The warnings that apply, each said on the progress channel as it is found."""
    found = tuple(w for w in warnings if w)
    for w in found:
        say(f"warning: {w}")
    return found


def make_layer_plan(
    inputs: PlanInputs, solve_options: SolveOptions, progress: Callable[[str], None] | None = None
) -> Plan:
    """Layer-split mode (planner/solve/layer_split.py): layer ranges over nodes, goodput only."""
    from planner.solve.layer_split import predict_split, solve_layer_split, split_attainment

    if inputs.objective != "goodput":
        raise ValueError("objective must be goodput with --layer-split (layer-split plans maximise goodput)")
    say = progress or (lambda _msg: None)
    hardware, _, stats, latency = read_inputs(inputs)
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
    max_flow = split.goodput_rps
    split = chain_idle_nodes(split, inputs, hardware, stats, latency, solve_options, say)
    nodes = plan_nodes(inputs.cluster, hardware, {s.node for s in split.stages})
    predicted = predict_split(split, hardware, inputs.model, latency, stats, inputs.slo)
    served, chain_warning = chained_goodput(split.stages, inputs.model.num_layers, max_flow)
    if served < predicted.rate_rps:  # forecast what the chains carry: every stage's flow scaled to it
        at = split_attainment(split, hardware, inputs.model, latency, stats, inputs.slo, served)
        predicted = replace(predicted, rate_rps=round(served, 4), goodput_rps=round(served, 4), attainment=round(at, 4))
    warnings = _warn(
        say,
        chain_warning,
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

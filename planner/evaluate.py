"""A placement simulated: the requests a simulation runs, its goodput search, and the MILP
iterating with the simulator (calibrate()).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from planner.problem import Problem, place
from planner.simulate.calibration import RoleCalibration, calibrate_role, calibrated
from planner.simulate.simulator import SimResult, Simulator
from planner.simulate.workload import Requests, Trace, WorkloadSpec
from planner.solve.capacity import (
    InstanceOption,
    WorkloadStats,
)
from planner.solve.milp import Placement, solve_placement
from planner.solve.solver import SolveOptions
from proto.plan import ROLES, Calibration
from proto.slo import SLOSpec

SIM_LIFETIMES = 3  # warm-up, counted window, cool-down
GOODPUT_SEARCH_STEPS = 6  # bisection steps of the simulated goodput, after the bracket


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
    """The MILP iterating with the simulator (planner/simulate/calibration.py), at most max_rounds rounds.

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

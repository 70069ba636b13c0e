"""Calibrate the capacity model by the simulator: factors per role from short simulations.

The queueing model (planner/solve/capacity.py) sizes every instance in closed form: a pooled
queue of prefill servers that prefill one prompt at a time, a decode batch kept within its
slots. The simulator runs the engine's scheduler behind the router: queued prompts share one
step and its fixed cost, decode admits into whatever room its KV has, and a request's TTFT
holds both its wait for prefill and its wait for decode room. This module measures, on a
placement the MILP proposes, what each role serves in simulation when the other costs
nothing, and scales that role's options by simulated over modelled; evaluate.calibrate
runs the rounds (the MILP proposes, the simulator measures, the MILP solves again):

    options --MILP--> placement --simulate prefill alone--> f_prefill = simulated / modelled
       ^                         --simulate decode alone --> f_decode
       |                         --simulate both (goodput G, rate R at f_prefill, f_decode)--> G / R, both roles
       +------ every option's capacity x its role's factors <---------------------------+

- prefill alone: requests keep their prompts but produce one token, so decode admits and
  finishes them as their KV lands; the capacity is the highest rate whose TTFT meets the
  SLO's TTFT percentile. Modelled: the placed prefill instances' capacities summed (the
  router's choice of the least loaded instance spreads load over all of them).
- decode alone: prefill steps take no time; the capacity is the highest rate at which TPOT
  meets its percentile and the wait for decode room (the TTFT of this run) meets the TTFT
  percentile. Modelled: the rate at which the first decode node reaches its capacity when
  the planned routes grow in proportion (the simulator routes decode as the plan does).

A factor multiplies an option's capacity for the MILP and divides the rate the forecast's
queue formulas see (InstanceOption.calibration), so the forecast and the plan agree with
the simulation they were calibrated on. Each search brackets the modelled capacity by
factors of 1.25 and then bisects, to within about 2%.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from planner.latency.roofline import Coefficients
from planner.simulate.simulator import SimResult, Simulator
from planner.simulate.workload import Requests
from planner.solve.capacity import InstanceOption
from planner.solve.milp import Placement

BRACKET_STEP = 1.25
SEARCH_STEPS = 4  # bisection steps after the bracket: within 25% / 2^4, about 1.5%
MAX_BRACKET_STEPS = 12  # a factor of 1.25^12 (about 15) either way at most
FREE = Coefficients(a=0.0, b=0.0, c=0.0, A=0.0, B=0.0, C=0.0)


@dataclass(frozen=True)
class RoleCalibration:
    """What one role of a placement serves within its SLO percentiles."""

    role: str
    modelled_rps: float  # by the (current) capacity model
    simulated_rps: float  # by simulation with the other role free

    @property
    def factor(self) -> float:
        return self.simulated_rps / self.modelled_rps if self.modelled_rps > 0 else 1.0


def modelled_capacity(placement: Placement, options: list[InstanceOption], role: str) -> float:
    """The rate at which the placement's role reaches its modelled capacity: prefill load
    spreads over all instances (the router picks the least loaded one), decode load follows
    the planned routes, so the decode node with the least headroom saturates first."""
    capacity: dict[str, float] = defaultdict(float)
    for (n, i), c in placement.counts.items():
        if options[i].role == role:
            capacity[n] += c * options[i].capacity_rps
    if role == "prefill":
        return sum(capacity.values())
    routed: dict[str, float] = defaultdict(float)
    for (_, d), r in placement.routes.items():
        routed[d] += r
    headroom = [capacity[n] / r for n, r in routed.items() if r > 0]
    return placement.rate_rps * min(headroom) if headroom else 0.0


def role_alone(instances: list[tuple[str, InstanceOption]], role: str) -> list[tuple[str, InstanceOption]]:
    """The instances with the other role made free: decode alone runs prefill steps of no
    time; prefill alone needs nothing changed (its requests produce one token)."""
    if role == "prefill":
        return instances
    return [(n, replace(o, coefficients=FREE) if o.role == "prefill" else o) for n, o in instances]


def meets(result: SimResult, role: str, slo) -> bool:
    """Whether the role, simulated alone, meets its SLO percentiles."""
    ttft_ok = float(np.mean(result.ttft_s <= slo.ttft_s)) >= slo.ttft_percentile / 100
    if role == "prefill":
        return ttft_ok
    return ttft_ok and float(np.mean(result.tpot_s <= slo.tpot_s)) >= slo.tpot_percentile / 100


def highest_rate(ok: Callable[[float], bool], start: float) -> float:
    """The highest rate at which ok holds, bracketed from start by BRACKET_STEP, then bisected."""
    if ok(start):
        lo, hi = start, start * BRACKET_STEP
        for _ in range(MAX_BRACKET_STEPS):
            if not ok(hi):
                break
            lo, hi = hi, hi * BRACKET_STEP
        else:
            return lo
    else:
        lo, hi = start / BRACKET_STEP, start
        for _ in range(MAX_BRACKET_STEPS):
            if ok(lo):
                break
            lo, hi = lo / BRACKET_STEP, lo
        else:
            return 0.0
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def calibrate_role(
    sim: Simulator,
    placement: Placement,
    options: list[InstanceOption],
    role: str,
    slo,
    sample: Callable[[float], tuple[Requests, tuple[float, float]]],
    progress: Callable[[str], None] | None = None,
) -> RoleCalibration:
    """Simulate the role alone on sim's instances (see the module docstring); sample(rate)
    gives the requests and the counted window of one run."""
    say = progress or (lambda _msg: None)
    alone = Simulator(role_alone(sim.instances, role), sim.routes, sim.cluster, sim.hardware, sim.model, sim.block_size)
    modelled = modelled_capacity(placement, options, role)

    def ok(rate: float) -> bool:
        requests, window = sample(rate)
        if role == "prefill":
            requests = Requests(requests.arrival_s, requests.input_tokens, np.ones_like(requests.output_tokens))
        good = meets(alone.run(requests, window), role, slo)
        say(f"  calibration, {role} alone: {rate:.2f} req/s {'meets' if good else 'misses'} its SLO percentiles")
        return good

    if modelled <= 0:
        return RoleCalibration(role, 0.0, 0.0)
    return RoleCalibration(role, modelled, highest_rate(ok, modelled))


def calibrated(options: list[InstanceOption], factors: dict[str, float]) -> list[InstanceOption]:
    """The options with each role's capacity scaled by its factor (cumulative over rounds)."""
    return [
        replace(
            o,
            capacity_rps=o.capacity_rps * factors.get(o.role, 1.0),
            calibration=o.calibration * factors.get(o.role, 1.0),
        )
        for o in options
    ]

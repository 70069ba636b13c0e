"""The planner's own forecast of a placement's TTFT, TPOT and SLO attainment at a rate.

Load is spread as the routes say, and inside a node over its instances in proportion to
their capacities (what the router's least-loaded choice approximates). Each prefill
instance is the queue of planner/solve/queueing.py; each decode instance runs the batch
queueing.decode_batch_pmf gives, with TPOT the step time of that batch (G/G/1 and a wider
batch for bursty arrivals). The router pools the prefill queues, so each prefill instance
waits as one of a pool of as many servers as the placement has prefill instances. An
option calibrated by the simulator (InstanceOption.calibration) is loaded in the formulas
by its rate over its factor. The figures of all instances are mixed by their share of the
requests.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from planner.solve import queueing
from planner.solve.capacity import InstanceOption, WorkloadStats, decode_tpot_exceed, prefill_service_s
from planner.solve.milp import Placement
from proto.plan import Metrics
from proto.slo import SLOSpec

# Half the last digit the table shows: a shortfall below this reads as meeting the goal.
ATTAINMENT_SHOWN = 5e-4
GOAL_RATE_STEPS = 20  # bisection steps for the rate that meets the goal: within 1e-6 of the plan's rate


@dataclass(frozen=True)
class _Loaded:
    option: InstanceOption
    rate_rps: float  # requests/s this instance serves

    @property
    def model_rate_rps(self) -> float:
        """The rate the queue formulas see: a calibrated option serves its calibration
        times what the model says, so it is loaded as by that much less."""
        return self.rate_rps / self.option.calibration


def _instance_loads(placement: Placement, options: list[InstanceOption], rate_rps: float) -> list[_Loaded]:
    scale = rate_rps / placement.rate_rps if placement.rate_rps else 0.0
    used: defaultdict[tuple[str, str], float] = defaultdict(float)
    for (p, d), r in placement.routes.items():
        used[p, "prefill"] += r * scale
        used[d, "decode"] += r * scale
    have: defaultdict[tuple[str, str], float] = defaultdict(float)
    for (n, i), c in placement.counts.items():
        have[n, options[i].role] += c * options[i].capacity_rps
    loads = []
    for (n, i), c in placement.counts.items():
        o = options[i]
        share = o.capacity_rps / have[n, o.role] if have[n, o.role] else 0.0
        loads.extend([_Loaded(o, used[n, o.role] * share)] * c)
    return [load for load in loads if load.rate_rps > 0]


def num_prefill_instances(placement: Placement, options: list[InstanceOption]) -> int:
    return sum(c for (_, i), c in placement.counts.items() if options[i].role == "prefill")


def _mixture_quantile(exceed, quantile: float, hi: float) -> float:
    lo = 0.0
    while exceed(hi) > 1 - quantile:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            return math.inf
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exceed(mid) > 1 - quantile else (lo, mid)
    return hi


def predict(
    placement: Placement, options: list[InstanceOption], stats: WorkloadStats, slo: SLOSpec, rate_rps: float
) -> Metrics:
    ttft_exceed, tpot_exceed = _exceed(placement, options, stats, rate_rps)
    return Metrics(
        rate_rps=round(rate_rps, 4),
        goodput_rps=round(placement.rate_rps, 4),
        attainment=round(_attainment(ttft_exceed, tpot_exceed, slo), 4),
        ttft_s=round(_mixture_quantile(ttft_exceed, slo.ttft_percentile / 100, slo.ttft_s), 4),
        tpot_s=round(_mixture_quantile(tpot_exceed, slo.tpot_percentile / 100, slo.tpot_s), 4),
    )


def attainment(
    placement: Placement, options: list[InstanceOption], stats: WorkloadStats, slo: SLOSpec, rate_rps: float
) -> float:
    """Forecast fraction of requests meeting both targets at rate_rps (predict's, without
    the percentiles, which cost most of its time)."""
    return _attainment(*_exceed(placement, options, stats, rate_rps), slo)


def _attainment(ttft_exceed: Callable[[float], float], tpot_exceed: Callable[[float], float], slo: SLOSpec) -> float:
    return float(np.clip((1 - ttft_exceed(slo.ttft_s)) * (1 - tpot_exceed(slo.tpot_s)), 0, 1))


def _exceed(
    placement: Placement, options: list[InstanceOption], stats: WorkloadStats, rate_rps: float
) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """P(TTFT > t) and P(TPOT > t) over all requests at rate_rps, as functions of t."""
    loads = _instance_loads(placement, options, rate_rps)
    prefill = [load for load in loads if load.option.role == "prefill"]
    decode = [load for load in loads if load.option.role == "decode"]
    services = {id(load.option): prefill_service_s(load.option.coefficients, stats) for load in prefill}
    pool = num_prefill_instances(placement, options)  # the router pools all their queues
    p_total = sum(load.rate_rps for load in prefill) or 1.0
    d_total = sum(load.rate_rps for load in decode) or 1.0

    def ttft_exceed(t: float) -> float:
        return (
            sum(
                load.rate_rps
                * queueing.ttft_exceed_prob(load.model_rate_rps, services[id(load.option)], t, stats.arrival_cv2, pool)
                for load in prefill
            )
            / p_total
        )

    def tpot_exceed(t: float) -> float:
        return (
            sum(
                load.rate_rps
                * decode_tpot_exceed(
                    load.option.coefficients, stats, load.model_rate_rps, t, load.option.max_batch_size
                )
                for load in decode
            )
            / d_total
        )

    return ttft_exceed, tpot_exceed


def rate_meeting_goal(attainment_at: Callable[[float], float], goal: float, rate_rps: float) -> float:
    """The highest rate up to rate_rps at which the forecast's attainment meets goal (the
    forecast falls as the rate rises); 0 when even a nearly idle cluster misses it."""
    lo, hi = 0.0, rate_rps
    if attainment_at(rate_rps * 1e-6) < goal - ATTAINMENT_SHOWN:
        return 0.0
    for _ in range(GOAL_RATE_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if attainment_at(mid) >= goal - ATTAINMENT_SHOWN else (lo, mid)
    return lo


def goal_warning(
    predicted: Metrics, slo: SLOSpec, attainment_at: Callable[[float], float], objective: str
) -> str | None:
    """What to say when the forecast at the plan's rate falls below the attainment goal:
    the rate at which it meets the goal, and what else would."""
    if predicted.attainment >= slo.attainment - ATTAINMENT_SHOWN:
        return None
    head = (
        f"forecast attainment {predicted.attainment:.3f} at {predicted.rate_rps:.2f} req/s is below the goal "
        f"{slo.attainment:.3f}"
    )
    meets = rate_meeting_goal(attainment_at, slo.attainment, predicted.rate_rps)
    if meets <= 0:
        return (
            f"{head} at any rate: even unloaded, more than {1 - slo.attainment:.1%} of requests miss the TTFT "
            f"or TPOT target; loosen the SLO or use faster GPUs"
        )
    instead = (
        "plan with a higher --target-rate for headroom" if objective == "cost" else "serve at most that, or add GPUs"
    )
    return (
        f"{head}; the forecast meets the goal up to {meets:.2f} req/s "
        f"({meets / predicted.rate_rps:.0%} of it): {instead}, or loosen the SLO"
    )

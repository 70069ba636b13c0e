"""The planner's own forecast of a placement's TTFT, TPOT and SLO attainment at a rate.

Load is spread as the routes say, and inside a node over its instances in proportion to
their capacities (what the router's least-loaded choice approximates). Each prefill
instance is the M/G/1 queue of planner/queueing.py; each decode instance runs the batch
queueing.decode_batch_pmf gives, with TPOT the step time of that batch. The
figures of all instances are mixed by their share of the requests.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from planner import queueing
from planner.capacity import InstanceOption, WorkloadStats, decode_tpot_exceed, prefill_service_s
from planner.milp import Placement
from proto.plan import Metrics
from proto.slo import SLOSpec


@dataclass(frozen=True)
class _Loaded:
    option: InstanceOption
    rate_rps: float  # requests/s this instance serves


def _instance_loads(placement: Placement, options: list[InstanceOption], rate_rps: float) -> list[_Loaded]:
    scale = rate_rps / placement.rate_rps if placement.rate_rps else 0.0
    used = defaultdict(float)
    for (p, d), r in placement.routes.items():
        used[p, "prefill"] += r * scale
        used[d, "decode"] += r * scale
    have = defaultdict(float)
    for (n, i), c in placement.counts.items():
        have[n, options[i].role] += c * options[i].capacity_rps
    loads = []
    for (n, i), c in placement.counts.items():
        o = options[i]
        share = o.capacity_rps / have[n, o.role] if have[n, o.role] else 0.0
        loads.extend([_Loaded(o, used[n, o.role] * share)] * c)
    return [l for l in loads if l.rate_rps > 0]


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


def predict(placement: Placement, options: list[InstanceOption], stats: WorkloadStats, slo: SLOSpec,
            rate_rps: float) -> Metrics:
    loads = _instance_loads(placement, options, rate_rps)
    prefill = [l for l in loads if l.option.role == "prefill"]
    decode = [l for l in loads if l.option.role == "decode"]
    services = {id(l.option): prefill_service_s(l.option.coefficients, stats) for l in prefill}
    p_total = sum(l.rate_rps for l in prefill) or 1.0
    d_total = sum(l.rate_rps for l in decode) or 1.0

    def ttft_exceed(t: float) -> float:
        return sum(l.rate_rps * queueing.ttft_exceed_prob(l.rate_rps, services[id(l.option)], t, l.option.pp)
                   for l in prefill) / p_total

    def tpot_exceed(t: float) -> float:
        return sum(l.rate_rps * decode_tpot_exceed(l.option.coefficients, stats, l.rate_rps / l.option.pp, t)
                   for l in decode) / d_total

    attainment = (1 - ttft_exceed(slo.ttft_s)) * (1 - tpot_exceed(slo.tpot_s))
    return Metrics(rate_rps=round(rate_rps, 4), goodput_rps=round(placement.rate_rps, 4),
                   attainment=round(float(np.clip(attainment, 0, 1)), 4),
                   ttft_s=round(_mixture_quantile(ttft_exceed, slo.ttft_percentile / 100, slo.ttft_s), 4),
                   tpot_s=round(_mixture_quantile(tpot_exceed, slo.tpot_percentile / 100, slo.tpot_s), 4))

"""Small planning inputs shared by the planner tests."""

from __future__ import annotations

from planner.latency.models import ARCHITECTURES
from planner.problem import PlanInputs
from planner.simulate.workload import LengthDist, WorkloadSpec
from proto.cluster import ClusterSpec
from proto.slo import SLOSpec

SLO = SLOSpec(ttft_s=0.4, tpot_s=0.1, ttft_percentile=90, tpot_percentile=90, attainment=0.9)
WORKLOAD = WorkloadSpec(
    rate_rps=4.0,
    input_tokens=LengthDist("lognormal", median=800, sigma=0.5, max=3000),
    output_tokens=LengthDist("uniform", min=20, max=300),
)


def make_inputs(nodes: list[dict], links: list[dict] = (), model: str = "llama-2-7b", **kwargs) -> PlanInputs:
    cluster = ClusterSpec.from_dict({"nodes": nodes, "links": list(links)})
    return PlanInputs(
        cluster=cluster,
        model=ARCHITECTURES[model],
        workload=kwargs.pop("workload", WORKLOAD),
        slo=kwargs.pop("slo", SLO),
        **kwargs,
    )


# Solver time limits in tests guard against a hung solver; no test races them, so a slow
# or loaded machine takes longer but reaches the same proven answer.
GENEROUS_TIME_LIMIT_S = 600.0

"""The simulator against closed forms and hand-computed timelines."""

from __future__ import annotations

import numpy as np
import pytest

from planner.evaluate import simulate
from planner.latency.gpus import node_hardware
from planner.latency.models import ARCHITECTURES
from planner.latency.roofline import Coefficients
from planner.problem import place, prepare
from planner.simulate.simulator import Simulator
from planner.simulate.workload import Requests
from planner.solve import queueing
from planner.solve.capacity import InstanceOption
from planner.solve.predict import predict
from planner.solve.solver import SolveOptions
from proto.cluster import ClusterSpec, NodeSpec
from tests.planner.inputs import GENEROUS_TIME_LIMIT_S, SLO, make_inputs

MODEL = ARCHITECTURES["llama-2-7b"]
NODE = NodeSpec("n", "A100-80GB", 8)
CLUSTER = ClusterSpec((NODE,))
HARDWARE = {"n": node_hardware(NODE)}


def option(
    role: str, coeffs: Coefficients, pp: int = 1, kv_tokens: int = 1 << 20, budget: int = 100, max_batch: int = 64
) -> InstanceOption:
    return InstanceOption(role, HARDWARE["n"], 1, pp, coeffs, kv_tokens, 1.0, max_batch, budget)


def simulator(*options: InstanceOption) -> Simulator:
    return Simulator([("n", o) for o in options], {("n", "n"): 1.0}, CLUSTER, HARDWARE, MODEL, block_size=16)


def requests(arrival_s, prompt: int, output: int) -> Requests:
    arrival = np.asarray(arrival_s, dtype=float)
    return Requests(arrival, np.full(len(arrival), prompt), np.full(len(arrival), output))


def test_prefill_queue_matches_md1_closed_form():
    service_s, rho, n = 0.1, 0.7, 20_000
    lam = rho / service_s
    prefill = option("prefill", Coefficients(a=service_s * 1e3, b=0, c=0, A=1, B=0, C=0))
    decode = option("decode", Coefficients(a=1, b=0, c=0, A=1, B=0, C=0))
    arrival = np.cumsum(np.random.default_rng(7).exponential(1 / lam, n))
    result = simulator(prefill, decode).run(requests(arrival, prompt=100, output=1))
    mean_closed_form = service_s + queueing.md1_mean_wait(lam, service_s)  # 0.2167 s
    assert result.ttft_s.mean() == pytest.approx(mean_closed_form, rel=0.05)
    p90 = queueing.ttft_quantile(lam, np.full(10, service_s), 0.9)
    assert np.percentile(result.ttft_s, 90) == pytest.approx(p90, rel=0.05)


def test_one_request_timeline_is_the_latency_model():
    c = Coefficients(a=10, b=0.1, c=1e-4, A=5, B=0.01, C=0.5)
    result = simulator(option("prefill", c, budget=4096), option("decode", c)).run(requests([0.0], 100, 11))
    prefill_s = c.prefill_ms(100) / 1e3
    transfer_s = 100 * MODEL.kv_bytes_per_token / (HARDWARE["n"].link_gb_s * 1e9)
    decode_s = sum(c.decode_ms(1, ctx) for ctx in range(101, 111)) / 1e3
    assert result.ttft_s == pytest.approx([prefill_s])
    assert result.tpot_s == pytest.approx([(transfer_s + decode_s) / 10])


def test_pipeline_runs_one_step_at_a_time():
    prefill = option("prefill", Coefficients(a=100, b=0, c=0, A=1, B=0, C=0), pp=2)
    result = simulator(prefill, option("decode", Coefficients(1, 0, 0, 1, 0, 0))).run(
        requests([0.0, 0.0, 0.0], prompt=100, output=1)
    )
    # As the engine runs stages: a step enters once the last one has left every stage (the
    # bubble of its micro-batches is in the step time), so one prompt per 100 ms step.
    assert sorted(result.ttft_s) == pytest.approx([0.1, 0.2, 0.3])


def test_decode_kv_limit_holds_back_prefill():
    c = Coefficients(a=10, b=0, c=0, A=10, B=0, C=0)
    # Decode KV holds one 100-token request: the second is reserved only once the first is done.
    decode = option("decode", c, kv_tokens=128)
    result = simulator(option("prefill", c), decode).run(requests([0.0, 0.0], prompt=100, output=5))
    first_done = 0.01 + 4 * 0.01  # prefill, then four decode steps (the transfer is microseconds)
    assert result.ttft_s[0] == pytest.approx(0.01)
    assert result.ttft_s[1] == pytest.approx(first_done + 0.01, rel=0.01)


def test_simulation_agrees_with_the_forecast_below_capacity():
    problem = prepare(
        make_inputs(
            [{"name": "a", "gpu_type": "A100-80GB", "num_gpus": 2}, {"name": "l4", "gpu_type": "L4", "num_gpus": 4}]
        )
    )
    placement, options = place(problem, SolveOptions(time_limit_s=GENEROUS_TIME_LIMIT_S))
    rate = 0.8 * placement.rate_rps
    simulated = simulate(problem, placement, options, rate, num_requests=1500).metrics(SLO, rate, None)
    predicted = predict(placement, options, problem.stats, SLO, rate)
    assert simulated.attainment >= SLO.attainment and predicted.attainment >= SLO.attainment
    assert simulated.tpot_s == pytest.approx(predicted.tpot_s, rel=0.35)
    assert simulated.ttft_s <= SLO.ttft_s and predicted.ttft_s <= SLO.ttft_s

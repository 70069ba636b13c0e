"""Bursty workloads: Gamma arrivals of a given CV, trace replay at a time scale, and the
queueing model's answer to burstiness."""

from __future__ import annotations

import numpy as np
import pytest

from planner.simulate.workload import LengthDist, WorkloadSpec, dispersion_index, load_trace
from planner.solve import queueing

LENGTHS = {
    "input_tokens": {"distribution": "fixed", "value": 100},
    "output_tokens": {"distribution": "fixed", "value": 10},
}


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_gaps_have_the_asked_cv_and_rate(cv):
    spec = WorkloadSpec.from_dict({"rate_rps": 5.0, "cv": cv, **LENGTHS})
    gaps = np.diff(spec.sample(200_000, seed=3).arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.05)
    assert spec.arrival_cv2() == pytest.approx(cv**2)


def test_cv_one_is_the_poisson_stream_as_before():
    spec = WorkloadSpec.from_dict({"rate_rps": 5.0, "cv": 1.0, **LENGTHS})
    expected = np.cumsum(np.random.default_rng(0).exponential(1 / 5.0, 100))
    assert spec.sample(100, seed=0).arrival_s == pytest.approx(expected)
    assert WorkloadSpec.from_dict({"rate_rps": 5.0, **LENGTHS}).arrival_cv2() == 1.0
    # The dispersion of a Poisson stream's counts is about 1, of bursty Gamma gaps about cv^2.
    assert dispersion_index(spec.sample(100_000, seed=1).arrival_s) == pytest.approx(1.0, abs=0.15)
    bursty = WorkloadSpec.from_dict({"rate_rps": 5.0, "cv": 2.0, **LENGTHS})
    assert dispersion_index(bursty.sample(100_000, seed=1).arrival_s) == pytest.approx(4.0, rel=0.2)


@pytest.fixture
def trace_file(tmp_path):
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:00:{i:02d}.5000000,{100 + i},{i + 1}" for i in range(0, 60, 2)
    ]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "t.csv"


def test_time_scale_replays_the_trace_gaps_multiplied(trace_file):
    trace = load_trace(trace_file)
    spec = WorkloadSpec.from_dict({"trace": trace_file.name, "time_scale": 0.25}, base_dir=trace_file.parent)
    assert spec.base_rate_rps(trace) == pytest.approx(2.0)  # 0.5 req/s four times as fast
    reqs = spec.sample(30, trace=trace)
    assert reqs.arrival_s == pytest.approx(trace.arrival_s * 0.25)
    # A trace's own burstiness survives any replay rate: counts in windows of equal expected size.
    assert spec.arrival_cv2(trace) == pytest.approx(dispersion_index(trace.arrival_s * 7.0))


@pytest.mark.parametrize(
    "data, field",
    [
        ({"rate_rps": 1, "cv": 0, **LENGTHS}, "workload.cv"),
        ({"rate_rps": 1, "cv": "high", **LENGTHS}, "workload.cv"),
        ({"rate_rps": 1, "time_scale": 2.0, **LENGTHS}, "workload.time_scale"),
        ({"trace": "t.csv", "cv": 2.0}, "workload.cv"),
        ({"trace": "t.csv", "time_scale": 2.0, "rate_rps": 3.0}, "workload.time_scale and workload.rate_rps"),
        ({"trace": "t.csv", "time_scale": -1}, "workload.time_scale"),
        ({"rate_rps": 1, "burstiness": 2, **LENGTHS}, "workload.burstiness"),
    ],
)
def test_workload_burstiness_errors_name_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        WorkloadSpec.from_dict(data)


def test_prefill_waits_grow_with_burstiness():
    service = np.random.default_rng(0).lognormal(np.log(0.05), 0.5, 400)
    rates = [queueing.max_rate(service, 0.4, 0.9, arrival_cv2=cv**2) for cv in (0.5, 1.0, 2.0, 4.0)]
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.7 * rates[1]
    assert queueing.max_rate(service, 0.4, 0.9, arrival_cv2=1.0) == queueing.max_rate(service, 0.4, 0.9)
    # Kingman's factor: (ca2 + cs2) / (1 + cs2); D/D/1-like arrivals and service never wait.
    assert queueing.burst_factor(1.0, service) == pytest.approx(1.0)
    assert queueing.burst_factor(0.0, np.full(5, 0.1)) == 0.0


def test_decode_batch_widens_with_burstiness():
    rho, a = 0.7, 20.0
    for cv2 in (0.5, 1.0, 4.0):
        pmf = queueing.decode_batch_pmf(rho, a, cv2)
        n = np.arange(len(pmf))
        mean, var = queueing.decode_batch_moments(rho, a, cv2)
        assert pmf.sum() == pytest.approx(1.0, abs=1e-6)
        assert (pmf * n).sum() == pytest.approx(mean, rel=1e-4)
        assert (pmf * n * n).sum() - mean**2 == pytest.approx(var, rel=1e-3)
    assert queueing.decode_batch_pmf(rho, a, 1.0) == pytest.approx(queueing.decode_batch_pmf(rho, a))
    # Nearly regular arrivals at a light load: a Poisson batch, computed without underflow.
    pmf = queueing.decode_batch_pmf(0.2, 4000.0, 0.01)
    assert pmf.sum() == pytest.approx(1.0, abs=1e-6)


def test_length_sampling_is_unchanged_by_the_arrivals():
    spec = WorkloadSpec(
        rate_rps=2.0,
        input_tokens=LengthDist("uniform", min=1, max=50),
        output_tokens=LengthDist("fixed", value=3),
        cv=3.0,
    )
    reqs = spec.sample(1000, seed=0)
    assert np.all(np.diff(reqs.arrival_s) >= 0) and reqs.input_tokens.min() >= 1

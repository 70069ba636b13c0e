"""Queueing formulas against their closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from planner.solve import queueing


def test_mm1_tail_is_exact():
    # Exponential service: the Cramer-Lundberg tail is exactly rho exp(-(mu - lam) x).
    mu, lam = 10.0, 6.0
    service = np.random.default_rng(0).exponential(1 / mu, 200_000)
    rho, theta, c = queueing.wait_tail(lam, service)
    assert rho == pytest.approx(0.6, rel=0.01)
    assert theta == pytest.approx(mu - lam, rel=0.03)
    assert c == pytest.approx(0.6, rel=0.03)


def test_max_rate_meets_the_percentile_exactly():
    service = np.full(50, 0.1)
    lam = queueing.max_rate(service, target_s=0.3, quantile=0.9)
    assert 0 < lam < 10
    assert queueing.ttft_exceed_prob(lam, service, 0.3) == pytest.approx(0.1, abs=1e-3)
    assert queueing.ttft_quantile(lam, service, 0.9) == pytest.approx(0.3, rel=1e-3)
    # Prompts slower than the target on their own: no rate meets it.
    assert queueing.max_rate(np.full(10, 0.5), 0.3, 0.9) == 0.0


def test_decode_batch_is_negative_binomial():
    rho, a = 0.7, 20.0
    pmf = queueing.decode_batch_pmf(rho, a)
    n = np.arange(len(pmf))
    assert pmf.sum() == pytest.approx(1.0, abs=1e-8)
    assert (pmf * n).sum() == pytest.approx((a + 1) * rho / (1 - rho), rel=1e-6)
    var = (pmf * n * n).sum() - (pmf * n).sum() ** 2
    assert var == pytest.approx((a + 1) * rho / (1 - rho) ** 2, rel=1e-5)
    assert queueing.batch_quantile(pmf, 0.5) <= 49 <= queueing.batch_quantile(pmf, 0.6)
    with pytest.raises(ValueError, match="below 1"):
        queueing.decode_batch_pmf(1.0, a)


def test_md1_mean_wait_closed_form():
    assert queueing.md1_mean_wait(5.0, 0.1) == pytest.approx(0.5 * 0.1 / (2 * 0.5))
    assert queueing.md1_mean_wait(10.0, 0.1) == float("inf")

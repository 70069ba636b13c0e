"""Queueing formulas for a prefill instance: an M/G/1 queue (M/D/1 when prompts are equal).

Requests arrive as a Poisson stream and are prefilled one at a time. The waiting time W in
the queue has, for M/G/1, an exponential tail (Cramer-Lundberg)::

    P(W > x) ~ C exp(-theta x),   theta > 0 solves  lam (E[exp(theta S)] - 1) = theta,
                                  C = (1 - rho) / (lam E[S exp(theta S)] - 1)

which is exact for M/M/1 (C = rho, theta = mu - lam) and close from the median on for
M/D/1. A request's TTFT is W plus its own prefill time S, independent of W. With pp
pipeline stages a new prompt can enter after one stage's time S/pp, so the queue serves at
S/pp while each request still takes S.
"""

from __future__ import annotations

import math

import numpy as np


def md1_mean_wait(lam: float, service_s: float) -> float:
    """Mean queueing delay of M/D/1 (Pollaczek-Khinchine): rho D / (2 (1 - rho))."""
    rho = lam * service_s
    if rho >= 1:
        return math.inf
    return rho * service_s / (2 * (1 - rho))


def wait_tail(lam: float, service_s: np.ndarray) -> tuple[float, float, float]:
    """(rho, theta, C) of the M/G/1 waiting-time tail for arrival rate lam."""
    mean = float(service_s.mean())
    rho = lam * mean
    if rho >= 1:
        return rho, 0.0, 1.0
    f = lambda th: lam * (np.exp(th * service_s).mean() - 1) - th  # noqa: E731
    lo, hi = 0.0, 1.0 / mean
    while f(hi) <= 0:  # f < 0 just above 0 (slope rho - 1) and convex: step past the root
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) <= 0 else (lo, mid)
    theta = (lo + hi) / 2
    c = (1 - rho) / (lam * float((service_s * np.exp(theta * service_s)).mean()) - 1)
    return rho, theta, min(max(c, 0.0), 1.0)


def ttft_exceed_prob(lam: float, service_s: np.ndarray, target_s: float, pp: int = 1) -> float:
    """P(TTFT > target_s) for Poisson arrivals at lam onto prefill times service_s."""
    if lam <= 0:
        return float((service_s > target_s).mean())
    rho, theta, c = wait_tail(lam, service_s / pp)
    if rho >= 1:
        return 1.0
    slack = target_s - service_s
    p_wait = np.where(slack < 0, 1.0, np.minimum(rho, c * np.exp(-theta * np.maximum(slack, 0.0))))
    return float(p_wait.mean())


def ttft_quantile(lam: float, service_s: np.ndarray, quantile: float, pp: int = 1) -> float:
    """The TTFT that a fraction `quantile` of requests meets, at arrival rate lam."""
    lo, hi = float(service_s.min()), float(service_s.max())
    while ttft_exceed_prob(lam, service_s, hi, pp) > 1 - quantile:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ttft_exceed_prob(lam, service_s, mid, pp) > 1 - quantile else (lo, mid)
    return hi


def max_rate(service_s: np.ndarray, target_s: float, quantile: float, pp: int = 1) -> float:
    """Highest arrival rate at which a fraction `quantile` of TTFTs stays within target_s."""
    allowed = 1 - quantile
    if ttft_exceed_prob(0.0, service_s, target_s) > allowed:
        return 0.0
    lo, hi = 0.0, pp / float(service_s.mean())
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ttft_exceed_prob(mid, service_s, target_s, pp) <= allowed else (lo, mid)
    return lo


def decode_batch_pmf(rho: float, a: float, max_n: int = 1 << 16) -> np.ndarray:
    """Stationary distribution of a decode instance's batch size N.

    A step of n sequences takes A + c n; each request needs s steps and arrives at rate
    lam. That is a processor-sharing queue whose speed grows with n, a birth-death chain
    with birth lam and death n / (A + c n) / s, so (insensitive to the distribution of s)

        P(N = n) = C(n + a, n) (1 - rho)^(a + 1) rho^n,   rho = lam s c,  a = A / c,

    a negative binomial: mean (a + 1) rho / (1 - rho), variance that over (1 - rho), far
    wider than a Poisson batch of the same mean once rho nears 1.
    """
    if rho >= 1:
        raise ValueError(f"decode load rho must be below 1, got {rho}")
    probs = [math.exp((a + 1) * math.log1p(-rho))]
    total = probs[0]
    n = 0
    while total < 1 - 1e-9 and n < max_n:
        n += 1
        probs.append(probs[-1] * rho * (n + a) / n)
        total += probs[-1]
    return np.asarray(probs)


def batch_quantile(pmf: np.ndarray, quantile: float) -> int:
    """Smallest n with P(N <= n) >= quantile."""
    return int(min(np.searchsorted(np.cumsum(pmf), quantile), len(pmf) - 1))

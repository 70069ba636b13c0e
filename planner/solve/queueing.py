"""Queueing formulas for a prefill instance: an M/G/1 queue (M/D/1 when prompts are equal),
and G/G/1 when arrivals come in bursts.

Requests arrive as a Poisson stream and are prefilled one at a time. The waiting time W in
the queue has, for M/G/1, an exponential tail (Cramer-Lundberg)::

    P(W > x) ~ C exp(-theta x),   theta > 0 solves  lam (E[exp(theta S)] - 1) = theta,
                                  C = (1 - rho) / (lam E[S exp(theta S)] - 1)

which is exact for M/M/1 (C = rho, theta = mu - lam) and close from the median on for
M/D/1. A request's TTFT is W plus its own prefill time S, independent of W. An instance of
pp pipeline stages is one such server too: the engine runs one step at a time (its stages
overlap only inside a step, on micro-batches), so S is the pipelined step's time
(planner/latency/roofline.py), not S/pp.

Bursty arrivals (gaps with squared coefficient of variation ca2, 1 for Poisson) wait
longer. Kingman's G/G/1 approximation, E[W] ~ rho / (1 - rho) E[S] (ca2 + cs2) / 2, is
the M/G/1 mean (Pollaczek-Khinchine) times (ca2 + cs2) / (1 + cs2), cs2 the service
times' squared coefficient of variation (the Allen-Cunneen form); the waiting time is
taken as the M/G/1 one stretched by that factor, so its tail decays at theta over it.
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


def burst_factor(arrival_cv2: float, service_s: np.ndarray) -> float:
    """How much longer a G/G/1 queue waits than M/G/1 at the same load (Kingman, in the
    Allen-Cunneen form): (ca2 + cs2) / (1 + cs2); 1 for Poisson arrivals."""
    mean = float(service_s.mean())
    cs2 = float(service_s.var()) / mean**2 if mean > 0 else 0.0
    return (arrival_cv2 + cs2) / (1 + cs2)


def erlang_c(num_servers: int, offered: float) -> float:
    """P(an arrival waits) in M/M/k with k = num_servers and offered load lam / mu < k
    (through Erlang B's recursion, which neither overflows nor underflows)."""
    b = 1.0
    for i in range(1, num_servers + 1):
        b = offered * b / (i + offered * b)
    return num_servers * b / (num_servers - offered * (1 - b))


def ttft_exceed_prob(
    lam: float, service_s: np.ndarray, target_s: float, arrival_cv2: float = 1.0, num_servers: int = 1
) -> float:
    """P(TTFT > target_s) for arrivals at lam per server (gaps of squared CV arrival_cv2;
    1 is Poisson) onto prefill times service_s, in a pool of num_servers such servers."""
    if lam <= 0:
        return float((service_s > target_s).mean())
    rho, theta, c = wait_tail(lam, service_s)
    if rho >= 1:
        return 1.0
    burst = burst_factor(arrival_cv2, service_s)
    p_wait = rho
    if num_servers > 1:
        p_wait = erlang_c(num_servers, num_servers * rho)
        c, theta = c * p_wait / rho, theta * num_servers
    if burst != 1.0:
        # Halfin-Whitt: P(wait) of a pool is a function of (1 - rho) sqrt(k) / sqrt(variability).
        beta = (1 - rho) * math.sqrt(num_servers)
        more = _halfin_whitt(beta / math.sqrt(burst)) / _halfin_whitt(beta)
        p_wait, c = min(p_wait * more, 1.0), c * more
    c, theta = min(c, 1.0), theta / burst
    slack = target_s - service_s
    exceed = np.where(slack < 0, 1.0, np.minimum(p_wait, c * np.exp(-theta * np.maximum(slack, 0.0))))
    return float(exceed.mean())


def _halfin_whitt(beta: float) -> float:
    """P(wait) of a many-server queue in the Halfin-Whitt regime, beta = (1 - rho) sqrt(k)."""
    if beta <= 0:
        return 1.0
    phi = math.exp(-beta * beta / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(beta / math.sqrt(2)))
    return 1 / (1 + beta * cdf / phi)


def ttft_quantile(lam: float, service_s: np.ndarray, quantile: float, arrival_cv2: float = 1.0) -> float:
    """The TTFT that a fraction `quantile` of requests meets, at arrival rate lam."""
    lo, hi = float(service_s.min()), float(service_s.max())
    while ttft_exceed_prob(lam, service_s, hi, arrival_cv2) > 1 - quantile:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ttft_exceed_prob(lam, service_s, mid, arrival_cv2) > 1 - quantile else (lo, mid)
    return hi


def max_rate(
    service_s: np.ndarray, target_s: float, quantile: float, arrival_cv2: float = 1.0, num_servers: int = 1
) -> float:
    """Highest arrival rate per server at which a fraction `quantile` of TTFTs stays within target_s."""
    allowed = 1 - quantile
    if ttft_exceed_prob(0.0, service_s, target_s) > allowed:
        return 0.0
    lo, hi = 0.0, 1 / float(service_s.mean())
    for _ in range(40):
        mid = (lo + hi) / 2
        ok = ttft_exceed_prob(mid, service_s, target_s, arrival_cv2, num_servers) <= allowed
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo


def decode_batch_moments(rho: float, a: float, arrival_cv2: float = 1.0) -> tuple[float, float]:
    """Mean and variance of a decode instance's batch size N (see decode_batch_pmf)."""
    if rho >= 1:
        raise ValueError(f"decode load rho must be below 1, got {rho}")
    mean = (a + 1) * rho / (1 - rho)
    return mean, mean / (1 - rho) + mean * (arrival_cv2 - 1)


def decode_batch_pmf(rho: float, a: float, arrival_cv2: float = 1.0, max_n: int = 1 << 16) -> np.ndarray:
    """Stationary distribution of a decode instance's batch size N.

    A step of n sequences takes A + c n; each request needs s steps and arrives at rate
    lam. That is a processor-sharing queue whose speed grows with n, a birth-death chain
    with birth lam and death n / (A + c n) / s, so (insensitive to the distribution of s)

        P(N = n) = C(n + a, n) (1 - rho)^(a + 1) rho^n,   rho = lam s c,  a = A / c,

    a negative binomial: mean (a + 1) rho / (1 - rho), variance that over (1 - rho), far
    wider than a Poisson batch of the same mean once rho nears 1.

    Bursty arrivals: the batch holds the arrivals of about one request lifetime, and over a
    long window a renewal stream's count has variance arrival_cv2 times its mean instead of
    its mean; the batch keeps its mean and gains (arrival_cv2 - 1) x mean of variance, as
    the negative binomial of those two moments (Poisson when the variance falls below the mean).
    """
    mean, var = decode_batch_moments(rho, a, arrival_cv2)
    if arrival_cv2 != 1.0:
        if var <= mean:
            return _poisson_pmf(mean, max_n)
        rho = 1 - mean / var  # the negative binomial with these moments, in the same form
        a = mean * (1 - rho) / rho - 1
    probs = [math.exp((a + 1) * math.log1p(-rho))]
    total = probs[0]
    n = 0
    while total < 1 - 1e-9 and n < max_n:
        n += 1
        probs.append(probs[-1] * rho * (n + a) / n)
        total += probs[-1]
    return np.asarray(probs)


def _poisson_pmf(mean: float, max_n: int) -> np.ndarray:
    """In logs: exp(-mean) underflows for batches of a thousand."""
    n = np.arange(min(int(mean + 12 * math.sqrt(mean) + 20), max_n) + 1)
    log_factorial = np.concatenate(([0.0], np.cumsum(np.log(n[1:]))))
    return np.exp(n * math.log(max(mean, 1e-300)) - mean - log_factorial)


def batch_quantile(pmf: np.ndarray, quantile: float) -> int:
    """Smallest n with P(N <= n) >= quantile."""
    return min(int(np.searchsorted(np.cumsum(pmf), quantile)), len(pmf) - 1)

"""The workload a plan serves: arrivals and prompt/output lengths, synthetic or from a trace.

In YAML, either an arrival rate with length distributions::

    rate_rps: 4.0
    cv: 2.0               # optional: burstiness, see below (default 1: Poisson)
    input_tokens: {distribution: lognormal, median: 1000, sigma: 0.6, max: 4096}
    output_tokens: {distribution: uniform, min: 50, max: 300}

or a trace in the Azure LLM inference format (CSV: TIMESTAMP, ContextTokens,
GeneratedTokens), optionally replayed faster or slower::

    trace: ../shared/data/azure-llm-2023/conv.csv
    rate_rps: 10.0        # optional: scale the trace's arrival times to this mean rate
    time_scale: 0.5       # or: replay the trace's own gaps multiplied by this (twice as fast)

Synthetic arrivals have Gamma-distributed gaps with coefficient of variation `cv` (the gaps'
standard deviation over their mean): cv = 1 is a Poisson stream, cv > 1 comes in bursts,
cv < 1 is more regular. BurstGPT (Wang et al., "BurstGPT: A Real-world Workload Dataset to
Optimize LLM Serving Systems", arXiv:2401.17644) fits production LLM traffic (Azure OpenAI
services) with Gamma inter-arrival times of this kind, burstier than Poisson.

Distributions: fixed {value}, uniform {min, max}, lognormal {median, sigma, max}.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from proto.schema import as_int, as_number, as_str, check_keys, load_document

DISTRIBUTIONS = {"fixed": ("value",), "uniform": ("min", "max"), "lognormal": ("median", "sigma")}
# A trace's burstiness is the variance over the mean of its arrival counts in windows that
# hold this many arrivals on average (the index of dispersion: 1 for Poisson, cv^2 for
# Gamma gaps). Counting in arrivals rather than seconds makes it the same at every rate the
# trace is replayed at; the window is about what a prefill queue sees within a TTFT target.
DISPERSION_WINDOW_ARRIVALS = 50


@dataclass(frozen=True)
class LengthDist:
    distribution: str  # one of DISTRIBUTIONS
    value: int = 0  # fixed
    min: int = 1  # uniform
    max: int = 0  # uniform: upper bound; lognormal: clip (0 = none)
    median: float = 0.0  # lognormal
    sigma: float = 0.0  # lognormal: std of log(length)

    @staticmethod
    def from_dict(where: str, data: dict) -> LengthDist:
        kind = as_str(f"{where}.distribution", (data or {}).get("distribution"), DISTRIBUTIONS)
        required = ("distribution",) + DISTRIBUTIONS[kind]
        check_keys(where, data, required, ("max",) if kind == "lognormal" else ())
        for key in required[1:] + (("max",) if "max" in data else ()):
            if key in ("median", "sigma"):
                as_number(f"{where}.{key}", data[key], minimum=0, exclusive=key == "median")
            else:
                as_int(f"{where}.{key}", data[key], minimum=1)
        if kind == "uniform" and data["max"] < data["min"]:
            raise ValueError(f"{where}.max ({data['max']}) must be >= {where}.min ({data['min']})")
        return LengthDist(**data)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.distribution == "fixed":
            out = np.full(n, self.value)
        elif self.distribution == "uniform":
            out = rng.integers(self.min, self.max + 1, n)
        else:
            out = np.rint(self.median * np.exp(self.sigma * rng.standard_normal(n)))
            if self.max:
                out = np.minimum(out, self.max)
        return np.maximum(out, 1).astype(np.int64)


@dataclass(frozen=True)
class Requests:
    """n requests: arrival times (seconds from 0, ascending) and token counts."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_s)


@dataclass(frozen=True)
class Trace:
    arrival_s: np.ndarray  # from the first request
    input_tokens: np.ndarray
    output_tokens: np.ndarray

    @property
    def rate_rps(self) -> float:
        return (len(self.arrival_s) - 1) / max(float(self.arrival_s[-1]), 1e-9)


def load_trace(path: str | Path) -> Trace:
    """Read a CSV with TIMESTAMP, ContextTokens, GeneratedTokens columns."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"workload.trace {str(file)!r} does not exist")
    times, inputs, outputs = [], [], []
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"workload.trace {str(file)!r} lacks columns {sorted(missing)}")
        for row in reader:
            times.append(datetime.fromisoformat(row["TIMESTAMP"]).timestamp())
            inputs.append(max(int(row["ContextTokens"]), 1))
            outputs.append(max(int(row["GeneratedTokens"]), 1))
    if len(times) < 2:
        raise ValueError(f"workload.trace {str(file)!r} needs at least two requests")
    order = np.argsort(times, kind="stable")
    arrival = np.asarray(times)[order]
    return Trace(arrival - arrival[0], np.asarray(inputs)[order], np.asarray(outputs)[order])


def dispersion_index(arrival_s: np.ndarray, window_arrivals: float = DISPERSION_WINDOW_ARRIVALS) -> float:
    """Variance over mean of the arrival counts in windows of window_arrivals expected
    arrivals (whole windows only); 1 for a Poisson stream."""
    rate = (len(arrival_s) - 1) / max(float(arrival_s[-1] - arrival_s[0]), 1e-9)
    window_s = window_arrivals / rate
    num_windows = int((arrival_s[-1] - arrival_s[0]) // window_s)
    if num_windows < 2:
        return 1.0
    counts = np.bincount(((arrival_s - arrival_s[0]) // window_s).astype(np.int64), minlength=num_windows)
    counts = counts[:num_windows]
    return float(counts.var() / max(counts.mean(), 1e-9))


@dataclass(frozen=True)
class WorkloadSpec:
    rate_rps: float | None = None  # mean arrival rate; with a trace: the rate to rescale it to
    input_tokens: LengthDist | None = None
    output_tokens: LengthDist | None = None
    trace: str | None = None  # path of an Azure-format CSV
    cv: float | None = None  # synthetic: coefficient of variation of the Gamma gaps (None: 1, Poisson)
    time_scale: float | None = None  # trace: replay its own gaps multiplied by this (instead of rate_rps)

    def __post_init__(self) -> None:
        if self.trace is None:
            if self.rate_rps is None or self.input_tokens is None or self.output_tokens is None:
                raise ValueError("workload needs either trace, or rate_rps with input_tokens and output_tokens")
            if self.time_scale is not None:
                raise ValueError(
                    "workload.time_scale scales a trace's arrival gaps: it needs workload.trace "
                    "(synthetic arrivals take workload.rate_rps and workload.cv)"
                )
        else:
            if self.input_tokens is not None or self.output_tokens is not None:
                raise ValueError("workload.trace gives the lengths: drop workload.input_tokens/output_tokens")
            if self.cv is not None:
                raise ValueError(
                    "workload.cv shapes synthetic arrivals; a trace keeps its own arrival gaps: drop "
                    "workload.cv (workload.time_scale replays the trace faster or slower)"
                )
            if self.time_scale is not None and self.rate_rps is not None:
                raise ValueError(
                    "workload.time_scale and workload.rate_rps both set the trace's replay rate: give one of them"
                )
        if self.rate_rps is not None:
            as_number("workload.rate_rps", self.rate_rps, minimum=0, exclusive=True)
        if self.cv is not None:
            as_number("workload.cv", self.cv, minimum=0, exclusive=True)
        if self.time_scale is not None:
            as_number("workload.time_scale", self.time_scale, minimum=0, exclusive=True)

    @staticmethod
    def from_dict(data: dict, base_dir: Path | None = None) -> WorkloadSpec:
        check_keys("workload", data, (), ("rate_rps", "cv", "input_tokens", "output_tokens", "trace", "time_scale"))
        trace = data.get("trace")
        if trace is not None:
            trace = as_str("workload.trace", trace)
            if base_dir is not None and not Path(trace).is_absolute():
                trace = str(base_dir / trace)  # relative to the workload file, like an include
        dists = {
            k: LengthDist.from_dict(f"workload.{k}", data[k]) for k in ("input_tokens", "output_tokens") if k in data
        }
        return WorkloadSpec(
            rate_rps=data.get("rate_rps"), trace=trace, cv=data.get("cv"), time_scale=data.get("time_scale"), **dists
        )

    @staticmethod
    def load(path) -> WorkloadSpec:
        return WorkloadSpec.from_dict(load_document(path, "workload"), Path(path).parent)

    def base_rate_rps(self, trace: Trace | None = None) -> float:
        if self.rate_rps is not None:
            return self.rate_rps
        assert self.trace is not None  # __post_init__: without a rate, a trace
        return (trace or load_trace(self.trace)).rate_rps / (self.time_scale or 1.0)

    def arrival_cv2(self, trace: Trace | None = None) -> float:
        """Burstiness of the arrivals as the queueing model takes it (planner/solve/queueing.py): the
        squared coefficient of variation of the gaps, cv^2 (1 for Poisson); for a trace, its
        index of dispersion, which a time scale or a rescaled rate leaves unchanged."""
        if self.trace is None:
            return (self.cv or 1.0) ** 2
        return dispersion_index((trace or load_trace(self.trace)).arrival_s)

    def sample(self, n: int, rate_rps: float | None = None, seed: int = 0, trace: Trace | None = None) -> Requests:
        """n requests at rate_rps (default: the workload's own rate).

        A trace is replayed from its start (cycled when n exceeds it) with its arrival
        gaps scaled to the rate; synthetic workloads draw Gamma gaps of mean 1 / rate and
        coefficient of variation cv (exponential ones, a Poisson stream, when cv is 1).
        """
        rng = np.random.default_rng(seed)
        rate = rate_rps or self.base_rate_rps(trace)
        if self.trace is None:
            assert self.input_tokens is not None and self.output_tokens is not None  # __post_init__
            cv = self.cv or 1.0
            # Drawn at every cv, so that the lengths drawn after them are the same at any cv:
            # a bursty run replays the Poisson run's requests, only their arrivals differ.
            gaps = rng.exponential(1.0 / rate, n)
            if cv != 1.0:
                shape = 1.0 / cv**2  # a Gamma's CV is 1 / sqrt(shape)
                gaps = np.random.default_rng([seed, 1]).gamma(shape, 1.0 / (rate * shape), n)
            arrival = np.cumsum(gaps)
            return Requests(arrival, self.input_tokens.sample(rng, n), self.output_tokens.sample(rng, n))
        trace = trace or load_trace(self.trace)
        idx = np.arange(n) % len(trace.arrival_s)
        gaps = np.diff(trace.arrival_s, prepend=trace.arrival_s[0])[idx]
        gaps[0] = 0.0
        arrival = np.cumsum(gaps) * (trace.rate_rps / rate)
        return Requests(arrival, trace.input_tokens[idx], trace.output_tokens[idx])

"""The workload a plan serves: arrivals and prompt/output lengths, synthetic or from a trace.

In YAML, either a Poisson arrival rate with length distributions::

    rate_rps: 4.0
    input_tokens: {distribution: lognormal, median: 1000, sigma: 0.6, max: 4096}
    output_tokens: {distribution: uniform, min: 50, max: 300}

or a trace in the Azure LLM inference format (CSV: TIMESTAMP, ContextTokens,
GeneratedTokens), optionally replayed faster or slower::

    trace: ../shared/data/azure-llm-2023/conv.csv
    rate_rps: 10.0        # optional: scale the trace's arrival times to this mean rate

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


@dataclass(frozen=True)
class LengthDist:
    distribution: str  # one of DISTRIBUTIONS
    value: int = 0  # fixed
    min: int = 1  # uniform
    max: int = 0  # uniform: upper bound; lognormal: clip (0 = none)
    median: float = 0.0  # lognormal
    sigma: float = 0.0  # lognormal: std of log(length)

    @staticmethod
    def from_dict(where: str, data: dict) -> "LengthDist":
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


@dataclass(frozen=True)
class WorkloadSpec:
    rate_rps: float | None = None  # Poisson rate; with a trace: the rate to rescale it to
    input_tokens: LengthDist | None = None
    output_tokens: LengthDist | None = None
    trace: str | None = None  # path of an Azure-format CSV

    def __post_init__(self) -> None:
        if self.trace is None:
            if self.rate_rps is None or self.input_tokens is None or self.output_tokens is None:
                raise ValueError("workload needs either trace, or rate_rps with input_tokens and output_tokens")
        elif self.input_tokens is not None or self.output_tokens is not None:
            raise ValueError("workload.trace gives the lengths: drop workload.input_tokens/output_tokens")
        if self.rate_rps is not None:
            as_number("workload.rate_rps", self.rate_rps, minimum=0, exclusive=True)

    @staticmethod
    def from_dict(data: dict, base_dir: Path | None = None) -> "WorkloadSpec":
        check_keys("workload", data, (), ("rate_rps", "input_tokens", "output_tokens", "trace"))
        trace = data.get("trace")
        if trace is not None:
            trace = as_str("workload.trace", trace)
            if base_dir is not None and not Path(trace).is_absolute():
                trace = str(base_dir / trace)  # relative to the workload file, like an include
        dists = {k: LengthDist.from_dict(f"workload.{k}", data[k])
                 for k in ("input_tokens", "output_tokens") if k in data}
        return WorkloadSpec(rate_rps=data.get("rate_rps"), trace=trace, **dists)

    @staticmethod
    def load(path) -> "WorkloadSpec":
        return WorkloadSpec.from_dict(load_document(path, "workload"), Path(path).parent)

    def base_rate_rps(self, trace: Trace | None = None) -> float:
        if self.rate_rps is not None:
            return self.rate_rps
        return (trace or load_trace(self.trace)).rate_rps

    def sample(self, n: int, rate_rps: float | None = None, seed: int = 0,
               trace: Trace | None = None) -> Requests:
        """n requests at rate_rps (default: the workload's own rate).

        A trace is replayed from its start (cycled when n exceeds it) with its arrival
        gaps scaled to the rate; synthetic workloads draw Poisson arrivals.
        """
        rng = np.random.default_rng(seed)
        rate = rate_rps or self.base_rate_rps(trace)
        if self.trace is None:
            arrival = np.cumsum(rng.exponential(1.0 / rate, n))
            return Requests(arrival, self.input_tokens.sample(rng, n), self.output_tokens.sample(rng, n))
        trace = trace or load_trace(self.trace)
        idx = np.arange(n) % len(trace.arrival_s)
        gaps = np.diff(trace.arrival_s, prepend=trace.arrival_s[0])[idx]
        gaps[0] = 0.0
        arrival = np.cumsum(gaps) * (trace.rate_rps / rate)
        return Requests(arrival, trace.input_tokens[idx], trace.output_tokens[idx])

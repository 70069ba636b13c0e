"""Latency targets a plan must meet.

In YAML::

    ttft_s: 0.4            # time to first token target
    ttft_percentile: 90    # ... met by this percentile of requests
    tpot_s: 0.1            # time per output token target (after the first)
    tpot_percentile: 90
    attainment: 0.9        # goal: the fraction of requests that meet both targets

Goodput is the highest request rate at which the attainment goal still holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proto.schema import as_number, check_keys, load_document


@dataclass(frozen=True)
class SLOSpec:
    ttft_s: float  # time to first token, seconds
    tpot_s: float  # time per output token after the first, seconds
    ttft_percentile: float = 90.0  # in (0, 100)
    tpot_percentile: float = 90.0  # in (0, 100)
    attainment: float = 0.9  # fraction of requests meeting both targets, in (0, 1]

    def __post_init__(self) -> None:
        as_number("slo.ttft_s", self.ttft_s, minimum=0, exclusive=True)
        as_number("slo.tpot_s", self.tpot_s, minimum=0, exclusive=True)
        for name in ("ttft_percentile", "tpot_percentile"):
            value = as_number(f"slo.{name}", getattr(self, name), minimum=0, exclusive=True, maximum=100)
            if value >= 100:
                raise ValueError(f"slo.{name} must be below 100 (a percentile), got {value}")
        as_number("slo.attainment", self.attainment, minimum=0, exclusive=True, maximum=1)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SLOSpec:
        check_keys("slo", data, ("ttft_s", "tpot_s"), ("ttft_percentile", "tpot_percentile", "attainment"))
        return SLOSpec(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def load(path: str | Path) -> SLOSpec:
        return SLOSpec.from_dict(load_document(path, "slo"))

    def describe(self) -> str:
        return (
            f"P{self.ttft_percentile:g} TTFT <= {self.ttft_s:g} s, "
            f"P{self.tpot_percentile:g} TPOT <= {self.tpot_s:g} s, attainment >= {self.attainment:.0%}"
        )

"""Published measurements the roofline is checked against, and its error on each.

points.yaml (beside this file) holds each measurement as its source reports it, with the
source cited. This module computes what the roofline (planner/latency/roofline.py) predicts for each
and the relative error; `python -m planner.validation` prints the table of docs/planner.md
("Validating the roofline"), and tests/planner/test_validation.py holds the error bound.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proto.schema import as_int, as_list, as_number, as_str, check_keys, load_document

POINTS_FILE = Path(__file__).with_name("points.yaml")

# kind -> (its shape fields, the measured_* fields it may give)
KINDS = {
    "prefill": (("model", "tp", "prompt_tokens"), ("measured_ms", "measured_fit")),
    "decode": (("model", "tp", "batch", "context"), ("measured_ms", "measured_fit")),
    "generate": (
        ("model", "tp", "batch", "input_tokens", "output_tokens"),
        ("measured_ms", "measured_out_tok_s_per_gpu"),
    ),
    "gemm": (("m", "n", "k", "dtype"), ("measured_ms", "measured_tflops")),
    "allreduce": (("tp", "bytes"), ("measured_ms",)),
}
COMMON_FIELDS = ("id", "source", "where", "kind", "gpu")


@dataclass(frozen=True)
class Source:
    title: str  # author or project, title, and the table it comes from
    url: str


@dataclass(frozen=True)
class Point:
    """One published measurement: what ran, where it is published, and what it took."""

    id: str
    source: str  # a key of the file's sources
    where: str  # the table and row in the source
    kind: str  # a key of KINDS
    gpu: str  # a GPU type of planner/latency/gpus.py
    shape: dict[str, Any]  # the kind's shape fields (ints, and the model and dtype names)
    measure: str  # which measured_* field the source gives
    value: float | tuple[float, float, float]  # that field's value, as published

    @property
    def measured_ms(self) -> float:
        s = self.shape
        if isinstance(self.value, tuple):  # measured_fit: a published fit, in the form of planner/latency/roofline.py
            a, b, c = self.value
            if self.kind == "prefill":
                return a + b * s["prompt_tokens"] + c * s["prompt_tokens"] ** 2
            return a + b * s["batch"] * s["context"] + c * s["batch"]
        if self.measure == "measured_ms":
            return self.value
        if self.measure == "measured_tflops":
            return 2 * s["m"] * s["n"] * s["k"] / (self.value * 1e12) * 1e3
        assert self.measure == "measured_out_tok_s_per_gpu", self.measure  # KINDS has no other
        return s["batch"] * s["output_tokens"] / (self.value * s["tp"]) * 1e3


@dataclass(frozen=True)
class Check:
    point: Point
    measured_ms: float
    predicted_ms: float

    @property
    def error(self) -> float:
        """Relative error of the prediction: +0.10 is 10% too slow, -0.10 10% too fast."""
        return self.predicted_ms / self.measured_ms - 1


def load_points(path: str | Path = POINTS_FILE) -> tuple[dict[str, Source], tuple[Point, ...]]:
    from planner.latency.gpus import GPU_TYPES
    from planner.latency.models import ARCHITECTURES
    from proto.kv import DTYPE_NAMES

    data = check_keys("validation points", load_document(path, "validation points"), ("sources", "points"))
    if not isinstance(data["sources"], dict):
        raise ValueError("sources must be a mapping of names to {title, url}")
    sources = {}
    for name, entry in data["sources"].items():
        check_keys(f"sources.{name}", entry, ("title", "url"))
        sources[name] = Source(
            as_str(f"sources.{name}.title", entry["title"]), as_str(f"sources.{name}.url", entry["url"])
        )
    points = []
    for i, entry in enumerate(as_list("points", data["points"])):
        where = f"points[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping, got {type(entry).__name__}")
        kind = as_str(f"{where}.kind", entry.get("kind"), KINDS)
        shape_fields, measures = KINDS[kind]
        given = [m for m in measures if m in entry]
        if len(given) != 1:
            raise ValueError(f"{where} ({kind}) must give exactly one of {', '.join(measures)}")
        check_keys(where, entry, COMMON_FIELDS + shape_fields + (given[0],))
        as_str(f"{where}.source", entry["source"], sources)
        shape: dict[str, Any] = {}
        for field in shape_fields:
            if field == "model":
                shape[field] = as_str(f"{where}.model", entry[field], ARCHITECTURES)
            elif field == "dtype":
                shape[field] = as_str(f"{where}.dtype", entry[field], DTYPE_NAMES)
            else:
                shape[field] = as_int(f"{where}.{field}", entry[field], minimum=1)
        if given[0] == "measured_fit":
            fit = as_list(f"{where}.measured_fit", entry["measured_fit"])
            if len(fit) != 3:
                raise ValueError(f"{where}.measured_fit must be [a, b, c], got {fit!r}")
            a, b, c = (as_number(f"{where}.measured_fit[{j}]", v) for j, v in enumerate(fit))
            value: float | tuple[float, float, float] = (a, b, c)
        else:
            value = as_number(f"{where}.{given[0]}", entry[given[0]], minimum=0, exclusive=True)
        points.append(
            Point(
                as_str(f"{where}.id", entry["id"]),
                entry["source"],
                as_str(f"{where}.where", entry["where"]),
                kind,
                as_str(f"{where}.gpu", entry["gpu"], GPU_TYPES),
                shape,
                given[0],
                value,
            )
        )
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise ValueError(f"points ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    return sources, tuple(points)


def predicted_ms(point: Point) -> float:
    """What the roofline predicts for the point: an operator's time, or a whole step's (or a
    static batch's) from the coefficients the planner uses."""
    from planner.latency.gpus import node_hardware
    from planner.latency.models import ARCHITECTURES
    from planner.latency.roofline import allreduce_ms, gemm_ms, roofline
    from proto.cluster import NodeSpec

    s = point.shape
    hw = node_hardware(NodeSpec("validation", point.gpu, s.get("tp", 1)))
    if point.kind == "gemm":
        return gemm_ms(hw.gpu, s["dtype"], s["m"], s["n"], s["k"])
    if point.kind == "allreduce":
        return allreduce_ms(hw, s["tp"], s["bytes"])
    coeffs = roofline(ARCHITECTURES[s["model"]], hw, s["tp"], 1)
    if point.kind == "prefill":
        return coeffs.prefill_ms(s["prompt_tokens"])
    if point.kind == "decode":
        return coeffs.decode_ms(s["batch"], s["batch"] * s["context"])
    # A static batch: its prompts in one prefill step (which gives each its first token), then
    # one decode step per further token, over a context one token longer each time.
    batch, prompt = s["batch"], s["input_tokens"]
    return coeffs.prefill_ms(batch * prompt, batch * prompt**2) + sum(
        coeffs.decode_ms(batch, batch * (prompt + j)) for j in range(1, s["output_tokens"])
    )


def validate(path: str | Path = POINTS_FILE) -> list[Check]:
    _, points = load_points(path)
    return [Check(p, p.measured_ms, predicted_ms(p)) for p in points]


def summary(checks: list[Check]) -> tuple[float, Check]:
    """The median absolute error and the worst check."""
    worst = max(checks, key=lambda c: abs(c.error))
    return statistics.median(abs(c.error) for c in checks), worst


def markdown_table(checks: list[Check]) -> str:
    """One row per point; the source column names the source (sources_list gives its address)."""
    rows = ["| point | source: table, row | measured ms | predicted ms | error |", "|---|---|---|---|---|"]
    for c in checks:
        p = c.point
        rows.append(
            f"| {p.id} | {p.source}: {p.where} | {_ms(c.measured_ms)} | {_ms(c.predicted_ms)} | {c.error:+.0%} |"
        )
    return "\n".join(rows)


def sources_list(sources: dict[str, Source]) -> str:
    return "\n".join(f"- `{name}`: {s.title}, {s.url}" for name, s in sources.items())


def source_table(checks: list[Check]) -> str:
    rows = ["| source | points | median abs error | max abs error |", "|---|---|---|---|"]
    for name in dict.fromkeys(c.point.source for c in checks):
        errors = [abs(c.error) for c in checks if c.point.source == name]
        rows.append(f"| {name} | {len(errors)} | {statistics.median(errors):.0%} | {max(errors):.0%} |")
    return "\n".join(rows)


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"

"""Helpers shared by the benchmarks: traces, timing, tables."""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_TRACE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure-llm-2023"


def read_trace(path: str | Path) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request of an Azure LLM trace CSV, in arrival order."""
    with open(path, newline="") as f:
        return [(int(row["ContextTokens"]), int(row["GeneratedTokens"])) for row in csv.DictReader(f)]


def median_time_s(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: str | Path | None, results: dict, table: str) -> None:
    """results.json and table.md into out (created), when a benchmark was given --out."""
    if not out:
        return
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (path / "table.md").write_text(table + "\n")

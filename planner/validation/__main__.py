"""python -m planner.validation: the roofline's error on every published measurement."""

from __future__ import annotations

from planner.validation import load_points, markdown_table, source_table, sources_list, summary, validate


def main() -> int:
    sources, _ = load_points()
    checks = validate()
    median, worst = summary(checks)
    print(sources_list(sources))
    print()
    print(markdown_table(checks))
    print()
    print(source_table(checks))
    print(f"\n{len(checks)} points: median |error| {median:.1%}, max {abs(worst.error):.1%} ({worst.point.id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

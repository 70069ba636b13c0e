"""The roofline against published measurements: a deterministic computation over the committed
points (planner/validation/points.yaml), not a timing."""

from __future__ import annotations

import pytest

from planner.validation import KINDS, load_points, summary, validate

MAX_MEDIAN_ERROR = 0.15
MAX_ERROR = 0.35


def test_the_roofline_holds_its_error_bound_on_every_published_point():
    checks = validate()
    median, worst = summary(checks)
    assert median <= MAX_MEDIAN_ERROR, f"median |error| {median:.1%}"
    assert abs(worst.error) <= MAX_ERROR, f"{worst.point.id}: {worst.error:+.1%}"


def test_the_points_cover_operators_and_whole_steps_at_several_tp():
    _, points = load_points()
    assert {p.kind for p in points} == set(KINDS)
    assert {p.shape["tp"] for p in points if p.kind in ("prefill", "decode", "generate")} >= {1, 2, 4}
    assert {p.gpu for p in points} >= {"A100-80GB", "H100", "H200", "T4"}
    assert len(points) >= 40


def test_every_point_cites_a_source_with_an_address():
    sources, points = load_points()
    assert {p.source for p in points} == set(sources)  # no source unused, none missing
    for name, source in sources.items():
        assert source.url.startswith("https://") and source.title, name


def test_measurements_are_converted_as_their_sources_state_them():
    _, points = load_points()
    by_id = {p.id: p for p in points}
    # 384 sequences x 128 tokens at 5,586 tokens/s: 8.80 s.
    assert by_id["trtllm-llama2-7b-a100-b384-128-128"].measured_ms == pytest.approx(384 * 128 / 5586 * 1e3)
    # DistServe's OPT-13B decode fit at 16 sequences of 512 tokens.
    a, b, c = 19.934702624895458, 0.0006269356524350583, 0.03850697740828398
    assert by_id["distserve-opt-13b-tp1-decode-16x512"].measured_ms == pytest.approx(a + b * 16 * 512 + c * 16)
    # 2 x 6912 x 16384 x 2048 FLOPs at 267.9 TFLOP/s.
    assert by_id["mamf-a100-6912x16384x2048"].measured_ms == pytest.approx(2 * 6912 * 16384 * 2048 / 267.9e9)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.update(flops=1), r"points\[0\].flops is not a known field"),
        (lambda p: p.update(source="blog"), r"points\[0\].source must be one of"),
        (
            lambda p: p.update(measured_ms=16),
            r"points\[0\] \(prefill\) must give exactly one of measured_ms, measured_fit",
        ),
        (lambda p: p.update(model="llama-9b"), r"points\[0\].model must be one of llama-2-7b"),
    ],
)
def test_a_bad_point_is_refused_by_field(write_yaml, edit, message):
    point = {
        "id": "x",
        "source": "s",
        "where": "table 1",
        "kind": "prefill",
        "model": "llama-2-7b",
        "gpu": "A100-80GB",
        "tp": 1,
        "prompt_tokens": 128,
        "measured_fit": [1, 2, 3],
    }
    edit(point)
    path = write_yaml(
        "points.yaml", {"sources": {"s": {"title": "t", "url": "https://example.org"}}, "points": [point]}
    )
    with pytest.raises(ValueError, match=message):
        load_points(path)

"""`tandem profile` on a tiny checkpoint on CPU, and the coefficient fit."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.cli import main
from planner.latency.models import resolve_model
from planner.latency.profile import fit_nonnegative, fit_served, neighbour_overlap, profile_engine
from planner.latency.roofline import Coefficients, LatencyTable, Profile
from proto.serving import StepRecord
from tests.checkpoints import make_checkpoint


def test_fit_recovers_coefficients_and_stays_nonnegative():
    t = np.array([16, 64, 128, 256, 512], dtype=float)
    features = np.stack([np.ones_like(t), t, t * t], axis=1)
    assert fit_nonnegative(features, 3 + 0.2 * t + 1e-4 * t * t) == pytest.approx([3, 0.2, 1e-4])
    # A slope the data drags below zero is held at zero, not fitted negative.
    coef = fit_nonnegative(features, 50 - 0.01 * t)
    assert (coef >= 0).all() and coef[1] == 0 and coef[2] == 0


def test_served_steps_are_refitted_per_kind_and_compared_with_the_profile():
    """fit_served: prefill-only steps give a, b, c and decode-only steps A, B, C, through the
    odd stretched step; mixed steps are left out; the report says how much slower than the
    profile (base) the steps ran."""
    base = Coefficients(a=10, b=0.2, c=1e-4, A=20, B=0.01, C=1.0, source="profile")
    served = Coefficients(a=15, b=0.25, c=2e-4, A=30, B=0.02, C=2.0, source="profile")
    steps = []
    for t in (16, 40, 64, 100, 128, 200, 256, 400, 512):
        for _ in range(3):
            steps.append(StepRecord(t, t * t, 0, 0, served.prefill_ms(t)))
    for b in range(1, 30):
        context = b * (100 + 7 * (b % 5))  # context per sequence varies, so B and C separate
        for _ in range(3):
            steps.append(StepRecord(0, 0, b, context, served.decode_ms(b, context)))
    steps.append(StepRecord(0, 0, 8, 968, 10 * served.decode_ms(8, 968)))  # a pause stretched one step
    steps.append(StepRecord(64, 64 * 64, 4, 400, 1.0))  # mixed: not fitted
    fitted, report = fit_served(steps, base)
    for name in ("a", "b", "c", "A", "B", "C"):
        assert getattr(fitted, name) == pytest.approx(getattr(served, name), rel=1e-3), name
    assert report["prefill"]["steps"] == 27 and report["decode"]["steps"] == 88
    assert 1.2 < report["prefill"]["served_over_base"] < 2.0
    assert 1.4 < report["decode"]["served_over_base"] < 2.1
    # Too few sizes of a kind to fit: that kind keeps the base's coefficients.
    only_decodes = [StepRecord(0, 0, 4, 400, 50.0)] * 10 + [StepRecord(0, 0, 5, 500, 55.0)] * 10
    fitted, report = fit_served(only_decodes, base)
    assert fitted == base and "prefill" not in report and report["decode"]["steps"] == 20


def test_the_served_fit_is_closest_where_most_steps_ran():
    """Hundreds of small batches and a few rare large ones from another regime: the fit
    weighs each size by its steps, so the common batches keep their times (with equal weights
    the ten rare sizes pull the batch of one to a third of its time)."""
    base = Coefficients(a=10, b=0.2, c=0.0, A=20, B=0.0, C=1.0, source="profile")
    steps = [StepRecord(0, 0, n, 100 * n, 30.0 + 5 * n) for n in range(1, 5) for _ in range(200)]
    steps += [StepRecord(0, 0, n, 100 * n, 10.0 * n) for n in range(20, 30)]
    fitted, _ = fit_served(steps, base)
    for n in range(1, 5):
        assert fitted.decode_ms(n, 100 * n) == pytest.approx(30.0 + 5 * n, rel=0.15), n


def test_steps_beside_a_neighbour_are_compared_with_steps_of_their_size_alone():
    """neighbour_overlap lines a worker's steps up with its neighbour's by their start times
    and compares steps of one size: batches of 2 ran 1.5x as long wholly inside prefill steps
    as between them; batches of 8 (slower, and only ever beside) are compared with nothing; a
    step half covered, or with no start time, is in neither."""
    prefill = [StepRecord(100, 0, 0, 0, 1000.0, at_s=10.0 + 4 * k) for k in range(6)]  # busy [10+4k, 11+4k]
    decode = []
    for k in range(6):
        decode.append(StepRecord(0, 0, 2, 0, 45.0, at_s=10.2 + 4 * k))  # inside a prefill step
        decode.append(StepRecord(0, 0, 2, 0, 30.0, at_s=12.0 + 4 * k))  # between them
        decode.append(StepRecord(0, 0, 8, 0, 300.0, at_s=10.5 + 4 * k))  # inside, no match alone
    decode.append(StepRecord(0, 0, 2, 0, 1000.0, at_s=10.9))  # half covered: neither
    decode.append(StepRecord(0, 0, 2, 0, 9000.0))  # no start time: left out
    found = neighbour_overlap(decode, prefill)
    assert found == {"alone_steps": 6, "beside_steps": 12, "sizes_compared": 1, "beside_over_alone": 1.5}
    assert neighbour_overlap(decode, [])["beside_over_alone"] is None


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    # Wide enough that compute, not per-step overhead, sets the prefill time on CPU.
    return make_checkpoint(
        tmp_path_factory.mktemp("profile") / "tiny",
        "llama",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )


def test_profile_command_writes_a_usable_profile(wide_model, tmp_path, capsys):
    # A small grid: under the test suite the engine's Triton kernels run interpreted.
    out = tmp_path / "profile.yaml"
    assert (
        main(
            [
                "profile",
                "--model",
                str(wide_model),
                "--out",
                str(out),
                "--gpu-type",
                "L4",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--repeats",
                "1",
                "--prefill-tokens",
                "16,64,256",
                "--decode-batches",
                "1,4",
                "--decode-contexts",
                "64",
            ]
        )
        == 0
    )
    profile = Profile.load(out)
    assert profile.model == "tiny"
    (entry,) = profile.entries
    assert (entry.gpu_type, entry.tp, entry.pp) == ("L4", 1, 1)
    assert entry.coefficients.source == "profile" and entry.coefficients.decode_ms(16, 16 * 256) > 0
    assert "prefill ms =" in capsys.readouterr().out
    # The planner takes it for the model it was measured with.
    assert LatencyTable(resolve_model(str(wide_model)), profile).profile is profile


def test_profiler_times_the_right_quantities(wide_model, monkeypatch):
    """With step times made up from what each step computed, the fit returns them exactly:
    the profiler counts prompt tokens, context tokens and batch sizes as the model means."""
    from planner.latency import profile as profile_module

    def fake_timed_step(engine):
        out = engine.schedule()
        decodes = [s for s in out.scheduled if s.seq.num_output_tokens > 0]
        tokens = sum(s.num_new_tokens for s in out.scheduled if s.seq.num_output_tokens == 0)
        context = sum(s.seq.num_computed_tokens + 1 for s in decodes)
        engine.run(out)
        ms = 2 + 0.05 * tokens + 1e-4 * tokens**2 if tokens else 1 + 0.001 * context + 0.3 * len(decodes)
        return ms, out

    monkeypatch.setattr(profile_module, "_timed_step", fake_timed_step)
    profile = profile_engine(
        str(wide_model), (16, 64, 256), (1, 2, 4), (32, 64), gpu_type="L4", device="cpu", dtype="float32", repeats=1
    )
    c = profile.entries[0].coefficients
    assert (c.a, c.b, c.c) == pytest.approx((2, 0.05, 1e-4), rel=1e-6)
    assert (c.A, c.B, c.C) == pytest.approx((1, 0.001, 0.3), rel=1e-6)

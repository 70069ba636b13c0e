"""`tandem plan latency`: one step's predicted time, where it came from, and errors that say why."""

from __future__ import annotations

import json

import pytest

from deploy.cli import main
from planner.latency.gpus import node_hardware
from planner.latency.models import ARCHITECTURES
from planner.latency.roofline import roofline
from proto.cluster import NodeSpec

MODEL = ARCHITECTURES["llama-2-13b"]
PREFILL = ["plan", "latency", "--model", "llama-2-13b", "--gpu", "A100-80GB", "--tp", "2", "--prefill-tokens", "1024"]
DECODE = [
    "plan",
    "latency",
    "--model",
    "llama-2-13b",
    "--gpu",
    "A100-80GB",
    "--tp",
    "2",
    "--decode-batch",
    "32",
    "--context",
    "1500",
]


def a100_tp2():
    return roofline(MODEL, node_hardware(NodeSpec("n", "A100-80GB", 2)), 2, 1)


def test_prefill_prints_the_step_time_and_its_source(capsys):
    assert main(PREFILL) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"llama-2-13b on A100-80GB tp=2 pp=1 (float16): a prefill of 1024 tokens takes "
        f"{a100_tp2().prefill_ms(1024):.2f} ms (roofline)"
    )
    assert lines[1].startswith("prefill ms = ") and "decode ms = " in lines[1]


def test_decode_emits_json(capsys):
    assert main(DECODE + ["--emit", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    coeffs = a100_tp2()
    assert out["decode_ms"] == pytest.approx(coeffs.decode_ms(32, 32 * 1500))
    assert (out["source"], out["decode_batch"], out["context"], out["tp"], out["pp"]) == ("roofline", 32, 1500, 2, 1)
    assert out["coefficients"]["decode_ms"]["A"] == pytest.approx(coeffs.A)
    assert "prefill_ms" not in out


def test_a_profile_entry_for_the_exact_configuration_wins(write_yaml, capsys):
    entry = {
        "gpu_type": "A100-80GB",
        "tp": 2,
        "pp": 1,
        "prefill_ms": {"a": 10, "b": 0.05, "c": 0},
        "decode_ms": {"A": 20, "B": 0.001, "C": 0.1},
    }
    profile = write_yaml("profile.yaml", {"model": "llama-2-13b", "entries": [entry]})
    assert main(PREFILL + ["--profile", profile, "--emit", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["source"], out["prefill_ms"]) == ("profile", pytest.approx(10 + 0.05 * 1024))
    # tp=4 has no entry: the roofline answers, and the text says why.
    assert main([*PREFILL[:7], "4", *PREFILL[8:], "--profile", profile]) == 0
    assert f"(roofline: {profile} has no entry for A100-80GB tp=4 pp=1)" in capsys.readouterr().out


def test_plan_without_a_subcommand_still_plans_and_names_missing_inputs(capsys):
    assert main(["plan", "--model", "llama-2-13b"]) == 2
    assert "the following arguments are required: --cluster, --workload, --slo" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        (("--gpu", "A100"), "--gpu 'A100' is not a known GPU type; known: H200, H100, A100-80GB"),
        (("--model", "llama-9b"), "model 'llama-9b' is neither a known architecture (llama-2-7b, llama-2-13b"),
        (
            ("--tp", "3"),
            "--tp 3 does not split llama-2-13b's 40 attention heads (40 KV heads) evenly; "
            "allowed: 1, 2, 4, 5, 8, 10, 20, 40",
        ),
        (("--pp", "41"), "--pp 41 exceeds llama-2-13b's 40 layers; allowed: 1 to 40"),
        (("--prefill-tokens", "0"), "--prefill-tokens must be >= 1, got 0"),
    ],
)
def test_errors_name_the_flag_and_the_allowed_values(capsys, change, message):
    flag, value = change
    argv = list(PREFILL)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_decode_needs_its_context_and_prefill_refuses_one(capsys):
    assert main(DECODE[:-2]) == 2
    assert "--context (context tokens of each sequence) is required with --decode-batch" in capsys.readouterr().err
    assert main(PREFILL + ["--context", "100"]) == 2
    assert "--context applies to --decode-batch only" in capsys.readouterr().err


def test_one_kind_of_step_exactly(capsys):
    for argv in (PREFILL[:-2], PREFILL + ["--decode-batch", "4"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "--prefill-tokens" in capsys.readouterr().err

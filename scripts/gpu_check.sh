#!/usr/bin/env bash
# The GPU check, in one call: on a machine with one NVIDIA GPU and a CUDA torch already
# installed (no ray, nixl or pulp needed, nothing downloaded), run every GPU test that one GPU
# can run and the engine's speed against the device's rooflines; write a JSON report and a log.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # default: $OUT when set, else ./gpu-check
#
# OUT_DIR/gpu_check.json   {"gpu": bool, "device", "tests": {passed, failed, skipped, errors,
#                            "failures": [...], "skips": [...]}, "speed": benchmarks/engine_roofline's
#                            report, "status": "passed" | "failed" | "dry-run"}
# OUT_DIR/gpu_check.log    everything printed
# Without a GPU it says so, checks its own plumbing (the tests are collected, the speed
# benchmark runs on a tiny shape on the CPU) and exits 0: CI runs it that way.
# Budget: under 8 minutes on one H100/H200 (the tests about 2, the 8B speed run about 3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

# What one GPU can run without ray, nixl or pulp. Tests in these files that need two GPUs or
# nixl skip, saying so.
TESTS=(tests/engine/test_kernels.py tests/engine/test_gpu_oracle.py tests/engine/test_oracle.py
       tests/kv_transfer/test_conformance.py)

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
    "$PY" -c "import torch; print('gpu_check: GPU', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
    "$PY" -m pytest -q -rs --continue-on-collection-errors --junitxml="$OUT_DIR/tests.xml" "${TESTS[@]}"
    "$PY" -m benchmarks.engine_roofline --shape llama-3-8b --dtype bfloat16 --out "$OUT_DIR/speed.json"
else
    GPU=0
    echo "gpu_check: no CUDA GPU here: dry run (the tests are collected, the speed benchmark runs a tiny shape on CPU)"
    "$PY" -m pytest -q --collect-only "${TESTS[@]}" > "$OUT_DIR/collected.txt" || echo "collection failed" >> "$OUT_DIR/collected.txt"
    tail -1 "$OUT_DIR/collected.txt"
    "$PY" -m benchmarks.engine_roofline --shape tiny --dtype float32 --device cpu --repeats 1 \
        --out "$OUT_DIR/speed.json"
fi

GPU=$GPU OUT_DIR=$OUT_DIR "$PY" - <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

out, gpu = os.environ["OUT_DIR"], os.environ["GPU"] == "1"
tests = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failures": [], "skips": []}
if not gpu:  # collected only
    lines = open(os.path.join(out, "collected.txt")).read().splitlines()
    tests["collected"] = sum("::" in line for line in lines)
    if "collection failed" in lines or not tests["collected"]:
        tests["errors"] += 1
        tests["failures"].append({"test": "(collection)", "message": "\n".join(lines[-20:])})
try:
    root = ET.parse(os.path.join(out, "tests.xml")).getroot() if gpu else ET.Element("none")
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next(iter(case), None)
        if outcome is None:
            tests["passed"] += 1
        elif outcome.tag == "skipped":
            tests["skipped"] += 1
            tests["skips"].append({"test": name, "reason": outcome.get("message", "")})
        elif outcome.tag in ("failure", "error"):
            tests["failed" if outcome.tag == "failure" else "errors"] += 1
            tests["failures"].append({"test": name, "message": (outcome.get("message") or "")[:500]})
except (OSError, ET.ParseError) as exc:
    tests["errors"] += 1
    tests["failures"].append({"test": "(collection)", "message": str(exc)})
try:
    speed = json.load(open(os.path.join(out, "speed.json")))
except (OSError, ValueError) as exc:
    speed = {"error": str(exc)}
ok = tests["failed"] == 0 and tests["errors"] == 0 and "error" not in speed
if gpu:
    status = "passed" if ok else "failed"
else:
    status = "dry-run" if ok else "failed"
report = {"gpu": gpu, "device": speed.get("device_name"), "status": status, "tests": tests, "speed": speed}
json.dump(report, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
counts = (f"{tests['collected']} tests collected" if not gpu else
          f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
print(f"gpu_check: {status}: {counts}, {tests['errors']} errors; report {os.path.join(out, 'gpu_check.json')}")
sys.exit(0 if ok else 1)
EOF

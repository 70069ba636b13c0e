#!/usr/bin/env bash
# Creates .venv in the repo root and installs Tandem into it (editable), with the extras
# named as arguments (e.g. `scripts/setup.sh test`). Safe to re-run: it does nothing when
# pyproject.toml, constraints.txt and the extras are unchanged since the last run.
#
# Without a GPU it installs the CPU build of torch 2.13.0 and never pulls CUDA packages.
# With a GPU (a torch that sees CUDA already installed for $PYTHON) the venv is created
# with --system-site-packages and that torch is pinned, so it is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=$(IFS=,; echo "$*")
pip_quiet=(--quiet --disable-pip-version-check)

has_cuda_torch() {
  "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

if [ ! -x .venv/bin/python ]; then
  if has_cuda_torch; then
    echo "setup: GPU torch found for $PYTHON; creating .venv that keeps it"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    echo "setup: no GPU torch found; creating .venv with CPU torch 2.13.0"
    "$PYTHON" -m venv .venv
  fi
fi
VPY=.venv/bin/python

stamp=".venv/.tandem-setup-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${extras:-none}"
if [ -f "$stamp" ]; then
  exit 0
fi

mkdir -p .venv
cp constraints.txt .venv/constraints.txt
if "$VPY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  # Keep the user's CUDA torch and the triton that came with it.
  sed -i '/^triton==/d' .venv/constraints.txt
  echo "torch==$("$VPY" -c 'import torch; print(torch.__version__)')" >> .venv/constraints.txt
else
  echo "torch==2.13.0+cpu" >> .venv/constraints.txt
  if ! "$VPY" -c 'import torch' 2>/dev/null; then
    echo "setup: installing torch 2.13.0 (CPU)"
    "$VPY" -m pip install "${pip_quiet[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "$VPY" -m pip install "${pip_quiet[@]}" "torch==2.13.0+cpu" \
           --index-url https://download.pytorch.org/whl/cpu
  fi
fi

echo "setup: installing tandem${extras:+[$extras]} (a few minutes on a fresh machine)"
"$VPY" -m pip install "${pip_quiet[@]}" -c .venv/constraints.txt -e ".${extras:+[$extras]}"
"$VPY" -m pip check
rm -f .venv/.tandem-setup-*
touch "$stamp"
echo "setup: done"

#!/bin/bash
# Run one benchmark command in two git revisions of this repository, alternated, so that both
# see the same machine load (docs/benchmarks.md):
#
#   bash benchmarks/ab_revisions.sh BASE NEW ROUNDS OUT -- python -m benchmarks.seam --setups disaggregated
#
# Each revision is checked out in a worktree under $OUT/trees; the command runs there with
# PYTHONPATH pointing at it (Ray workers inherit it), and its --out is $OUT/<base|new>-<round>.
set -eu
base=$1 new=$2 rounds=$3 out=$4
shift 4
[ "$1" = "--" ] && shift
python=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
mkdir -p "$out/trees"
for side in base new; do
  rev=$base; [ $side = new ] && rev=$new
  [ -d "$out/trees/$side" ] || git worktree add -f --detach "$out/trees/$side" "$rev" >/dev/null
done
for round in $(seq 1 "$rounds"); do
  for side in base new; do
    tree=$(cd "$out/trees/$side" && pwd)
    echo "== round $round $side ($(git -C "$tree" rev-parse --short HEAD)) $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$tree" && PYTHONPATH="$tree" PYTHONUNBUFFERED=1 "${@/#python/$python}" --out "$out/$side-$round")
  done
done

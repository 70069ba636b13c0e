#!/usr/bin/env bash
# Sets up .venv and runs the main job: `tandem demo` starts a local Ray cluster with one
# prefill and one decode worker of the embedded default model (built into the user cache
# on first run, about a minute on 2 cores), puts the gRPC and HTTP router in front, answers
# one OpenAI completion request through the disaggregated path, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tandem demo "$@"

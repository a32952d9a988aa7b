#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs the whole suite, the tests against a real ComfyUI included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k contract`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not gpu" -p no:cacheprovider "$@"

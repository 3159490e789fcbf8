#!/usr/bin/env bash
# One command for a machine with one CUDA GPU (< 8 minutes): forward and training-step speed, the demo
# trained end to end, and the `gpu` tests. Writes outputs/gpu_check/gpu_check.md and gpu_check.json.
#   bash bench/gpu_check.sh [--out DIR] [--budget-s 450] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/gpu_check.py --python "$PYTHON" "$@"

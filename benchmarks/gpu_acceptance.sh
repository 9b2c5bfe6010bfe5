#!/usr/bin/env bash
# GPU day in one command (see benchmarks/gpu_acceptance.py): build, pytest -m gpu, compute-sanitizer,
# decode and kernel benchmarks within a time budget; results (<= 8 files) in $OUT or benchmarks/results/.
#   bash benchmarks/gpu_acceptance.sh [--budget SECONDS] [--dry-run] [--steps a,b] [--full-benchmarks]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_acceptance.py "$@"

#!/usr/bin/env bash
# The test command of the README (and of CI): set up .venv, then run the whole suite on the CPU.
# TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors through Triton's interpreter, which
# is how every Triton kernel is tested on machines without a GPU. On a GPU machine,
# `bash scripts/gpu.sh tests` runs the suite on the compiled kernels instead (docs/gpu_day.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
python -m pytest python_tests "$@"

#!/usr/bin/env bash
# CI on the oldest supported stack (scripts/setup_oldest_env.sh: torch 2.13.0, triton 3.6.0,
# numpy < 2), from this source tree (PYTHONPATH), with TRITON_INTERPRET=1:
#   - the AOT compile gate (python_tests/test_aot_gate.py: sm_70/80/90a with triton 3.6's
#     compiler; ~5 min on 2 cores against ~1 min with 3.9),
#   - the tests of the Triton kernels themselves under 3.6's interpreter (OLDEST_TESTS).
# Not the whole suite: the rest (torch reference, C++ backend, transformers, distributed)
# does not touch triton, and runs on the newest stack in scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/scripts/setup_oldest_env.sh" | tail -n 1)"
OLDEST_TESTS=(python_tests/test_aot_gate.py python_tests/test_triton_backend.py
              python_tests/test_triton_histogram_parts.py python_tests/test_triton_loops.py
              python_tests/test_mask_bits.py
              python_tests/test_supported_versions.py)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=1
"$PY" -c 'import dps_kernels, os, sys; root = os.environ["PYTHONPATH"].split(":")[0]
sys.exit(0 if dps_kernels.__file__.startswith(root) else f"dps_kernels from {dps_kernels.__file__}, not {root}")'
"$PY" -m pytest "${OLDEST_TESTS[@]}" "$@"

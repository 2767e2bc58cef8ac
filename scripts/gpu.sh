#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command, for whoever has one:
#   1. the test suite on the compiled Triton kernels (no interpreter; the CUDA variants of
#      the Triton tests run with larger sizes);
#   2. the GPU benchmarks: fused step vs torch.optim.AdamW(fused=True), radix select vs
#      torch.sort, BERT-large end to end (batch 16 and 32);
#   3. the compile gate and the roofline for the machine's own record.
# Results are appended/written under bench/results/ (commit them with the GPU's name).
# The setup installs a CPU build of torch; on a GPU machine point DPS_TORCH_SPEC at a CUDA
# build first, e.g. DPS_TORCH_SPEC="torch==2.13.0" with the CUDA index configured for pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for GPU machines (bash scripts/test.sh runs the CPU suite)')"
unset TRITON_INTERPRET
mkdir -p bench/results
DEVICE="$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))')"
python -m pytest python_tests -q 2>&1 | tee "bench/results/gpu_tests_${DEVICE}.txt"
python bench/triton_step.py
python bench/triton_select.py
python -m bench --batch 16 --name "${DEVICE}_e2e_b16" --out bench/results
python -m bench --batch 32 --name "${DEVICE}_e2e_b32" --out bench/results
python -m bench.host_overhead --shrink 1 --out "bench/results/host_overhead_${DEVICE}"

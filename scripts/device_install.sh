# Sourced by scripts/gpu_check.sh and scripts/gpu_finetune.sh: install the checkout on the device machine.
#
#   device_install SECONDS [CUDA_DEFAULT]   needs REPO, OUT, PY; sets INSTALL to what happened
#
# Tries `pip install --no-build-isolation --no-deps -e .` (no network there), then once more without
# the CUDA extension, then falls back to importing from the checkout: setup.py maps kernels/ to
# fastbert.kernels, so a sitecustomize puts that alias in sys.modules before anything imports.
# GPU_CHECK_INSTALL=shim forces the fallback (to test it).

device_install() {
    local seconds="$1" cuda_default="${2:-}"
    : >"$OUT/install.log"
    INSTALL="failed"
    local cuda="${FASTBERT_CUDA:-$cuda_default}"
    if [ "${GPU_CHECK_INSTALL:-pip}" = pip ] && timeout -k 10 "$seconds" env ${cuda:+FASTBERT_CUDA=$cuda} \
            MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -e . >>"$OUT/install.log" 2>&1; then
        INSTALL="editable${cuda:+ (FASTBERT_CUDA=$cuda)}"
    elif [ "${GPU_CHECK_INSTALL:-pip}" = pip ] && [ "$cuda" != "0" ] \
            && echo "-- retry without the CUDA extension" >>"$OUT/install.log" \
            && timeout -k 10 120 env FASTBERT_CUDA=0 "$PY" -m pip install --no-build-isolation --no-deps -e . \
               >>"$OUT/install.log" 2>&1; then
        INSTALL="editable, no CUDA extension (its build failed or timed out: see install.log)"
    else
        local shim=/tmp/fastbert_shim
        mkdir -p "$shim"
        cat >"$shim/sitecustomize.py" <<'PYEOF'
"""Device fallback: alias fastbert.kernels to <repo>/kernels, as setup.py's package_dir does."""
import importlib.util
import os
import sys

_kernels = os.path.join(os.environ["FASTBERT_REPO"], "kernels")
_spec = importlib.util.spec_from_file_location("fastbert.kernels", os.path.join(_kernels, "__init__.py"),
                                               submodule_search_locations=[_kernels])
_mod = importlib.util.module_from_spec(_spec)
sys.modules["fastbert.kernels"] = _mod
_spec.loader.exec_module(_mod)
PYEOF
        export FASTBERT_REPO="$REPO" PYTHONPATH="$shim:$REPO${PYTHONPATH:+:$PYTHONPATH}"
        INSTALL="fallback: PYTHONPATH + fastbert.kernels alias (see install.log)"
    fi
    tail -n 3 "$OUT/install.log"
    echo "install: $INSTALL"
    "$PY" -c "import fastbert, fastbert.kernels.attention as a, fastbert.ops as o; \
print('fastbert from', fastbert.__file__, '| kernels from', a.__file__); print(o.describe_default('cuda'))"
}

# Sourced by scripts/gpu_check.sh and scripts/gpu_finetune.sh: install the checkout on the device machine.
#
#   device_install SECONDS [CUDA_DEFAULT]   needs REPO, OUT, PY; sets INSTALL to what happened
#
# Tries `pip install --no-build-isolation --no-deps -e .` (no network there), then once more without
# the CUDA extension, then falls back to importing from the checkout: setup.py maps kernels/ to
# fastbert.kernels, so a sitecustomize puts that alias in sys.modules before anything imports.
# GPU_CHECK_INSTALL=shim forces the fallback (to test it).
#
# Unless the extension is turned off (FASTBERT_CUDA=0), a prebuilt wheel carried in
# $FASTBERT_PREBUILT (default .gpu/carry/prebuilt, from prepare_gpu_carry.py --prebuilt) saves
# compiling fastbert._C here (minutes of device time): when the wheel's `.stamp` equals this
# checkout's `csrc/build_ext.py stamp` (csrc/ sources and headers, arch flags, this Python) and its
# fastbert._C loads (with a GPU: sees it), that module is copied into fastbert/ and the editable
# install runs with FASTBERT_CUDA=0. Otherwise nvcc builds it as before.

# The path of a fastbert._C taken from a prebuilt wheel fit for this checkout and machine; fails when
# there is none (the reason goes to install.log).
prebuilt_extension() {
    local dir="${FASTBERT_PREBUILT:-$REPO/.gpu/carry/prebuilt}" want stamp module
    compgen -G "$dir/*.stamp" >/dev/null || return 1
    want=$("$PY" "$REPO/csrc/build_ext.py" stamp 2>>"$OUT/install.log") || return 1
    for stamp in "$dir"/*.stamp; do
        [ -f "${stamp%.stamp}" ] && [ "$(cat "$stamp")" = "$want" ] || continue
        # Extracted and loaded from its file, as tests/test_cuda_build.py loads it; where nvidia-smi
        # says there is a GPU the module must see it (a driver older than its CUDA runtime fails here).
        if module=$("$PY" - "${stamp%.stamp}" "$(mktemp -d)" 2>>"$OUT/install.log" <<'PYEOF'
import importlib.util, shutil, sys, zipfile
from pathlib import Path
with zipfile.ZipFile(sys.argv[1]) as wheel:
    (name,) = [n for n in wheel.namelist() if n.startswith("fastbert/_C") and n.endswith(".so")]
    module = Path(sys.argv[2]) / Path(name).name
    module.write_bytes(wheel.read(name))
spec = importlib.util.spec_from_file_location("fastbert._C", module)
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
if shutil.which("nvidia-smi"):
    assert C.device_count() > 0, "the prebuilt module sees no GPU"
print(module)
PYEOF
        ); then
            echo "-- fastbert._C from ${stamp%.stamp} (stamp $want)" >>"$OUT/install.log"
            echo "$module"
            return 0
        fi
        echo "-- the fastbert._C of ${stamp%.stamp} does not load here (above)" >>"$OUT/install.log"
    done
    echo "-- no prebuilt wheel in $dir matches this checkout (stamp $want)" >>"$OUT/install.log"
    return 1
}

device_install() {
    local seconds="$1" cuda_default="${2:-}"
    : >"$OUT/install.log"
    INSTALL="failed"
    local cuda="${FASTBERT_CUDA:-$cuda_default}" prebuilt=""
    if [ "${GPU_CHECK_INSTALL:-pip}" = pip ] && [ "$cuda" != "0" ] && prebuilt=$(prebuilt_extension) \
            && cp "$prebuilt" "$REPO/fastbert/" \
            && timeout -k 10 120 env FASTBERT_CUDA=0 "$PY" -m pip install --no-build-isolation --no-deps -e . \
               >>"$OUT/install.log" 2>&1; then
        INSTALL="editable, fastbert._C from a prebuilt wheel (its stamp matches; install.log names it)"
    elif [ "${GPU_CHECK_INSTALL:-pip}" = pip ] && timeout -k 10 "$seconds" env ${cuda:+FASTBERT_CUDA=$cuda} \
            MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -e . >>"$OUT/install.log" 2>&1; then
        INSTALL="editable${cuda:+ (FASTBERT_CUDA=$cuda)}"
    elif [ "${GPU_CHECK_INSTALL:-pip}" = pip ] && [ "$cuda" != "0" ] \
            && echo "-- retry without the CUDA extension" >>"$OUT/install.log" \
            && timeout -k 10 120 env FASTBERT_CUDA=0 "$PY" -m pip install --no-build-isolation --no-deps -e . \
               >>"$OUT/install.log" 2>&1; then
        INSTALL="editable, no CUDA extension (its build failed or timed out: see install.log)"
    else
        local shim  # its own folder: two installs at once (tests in parallel) must not share a file
        shim=$(mktemp -d "${TMPDIR:-/tmp}/fastbert_shim.XXXXXX")
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

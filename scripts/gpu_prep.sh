#!/usr/bin/env bash
# What a session lent a GPU does here, before its first device call, from a fresh checkout.
#
#   bash scripts/gpu_prep.sh [--no-carry]
#
# Device minutes are few (15 a session, starts included) and a bare device compiles csrc/ for
# minutes, so everything that can be made here is made here first; this costs only wall time:
#   1. .venv (`make venv`), whose Python runs build_wheels.py, auditwheel and prepare_gpu_carry.py;
#   2. the cp312 wheel for the GPU image's Python (3.12) in .gpu/prebuilt, with its build stamp.
#      Rebuilt only when the stamp of this checkout's csrc/ (csrc/build_ext.py stamp, under a 3.12
#      Python with setuptools: build_wheels.py's build/wheel-envs/cp312) differs from the stamp beside
#      the wheel there (stop 23, 2 cores: the wheel 64 s; with .venv from nothing about 3 min);
#   3. .gpu/carry (prepare_gpu_carry.py --prebuilt .gpu/prebuilt): the wheel again under
#      .gpu/carry/prebuilt (what gpu_check.sh carries), and, unless --no-carry, the float16 MiniLM,
#      SST-2 train and the SQuAD articles for scripts/gpu_finetune.sh (about 59 MiB).
# Then it prints the device calls of ARCHITECTURE.md's GPU plan with this checkout's commit.
# Environment: PYTHON312 (default /root/.pyenv/versions/3.12.1/bin/python, else python3.12 on PATH).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

CARRY=1
for arg in "$@"; do
    case "$arg" in
        --no-carry) CARRY=0 ;;
        *) echo "gpu_prep.sh: unknown argument $arg (usage: bash scripts/gpu_prep.sh [--no-carry])" >&2; exit 2 ;;
    esac
done

PY312="${PYTHON312:-/root/.pyenv/versions/3.12.1/bin/python}"
if [ ! -x "$PY312" ]; then
    PY312="$(command -v python3.12 || true)"
fi
if [ -z "$PY312" ] || [ "$("$PY312" -c 'import sys; print(sys.version_info[:2] == (3, 12))')" != True ]; then
    echo "gpu_prep.sh: need a Python 3.12 (the GPU image's) to build the wheel: set PYTHON312" >&2
    exit 2
fi
command -v nvcc >/dev/null || { echo "gpu_prep.sh: nvcc is not on PATH: the wheel would have no fastbert._C" >&2; exit 2; }

start=$SECONDS
make -s venv
PY=.venv/bin/python
# The stamp names the extension suffix of the Python computing it (3.12's) and imports setuptools:
# the 3.12 itself when it has setuptools, else the build venv build_wheels.py makes for it.
STAMP_PY=build/wheel-envs/cp312/bin/python
"$PY312" -c 'import setuptools' 2>/dev/null && STAMP_PY="$PY312"

current_stamp() { [ -x "$STAMP_PY" ] && "$STAMP_PY" csrc/build_ext.py stamp; }
prebuilt_matches() {
    local want="$1" stamp
    for stamp in .gpu/prebuilt/*.whl.stamp; do
        [ -f "$stamp" ] && [ -f "${stamp%.stamp}" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
    done
    return 1
}

want="$(current_stamp || true)"
if [ -n "$want" ] && prebuilt_matches "$want"; then
    echo "-- .gpu/prebuilt already holds the wheel of this csrc/ (stamp $want)"
else
    rm -rf .gpu/prebuilt
    wheels="$(mktemp -d)"
    "$PY" scripts/build_wheels.py --python "$PY312" --out "$wheels" --prebuilt .gpu/prebuilt
    rm -rf "$wheels"
    want="$(current_stamp)"
    prebuilt_matches "$want" || { echo "gpu_prep.sh: the wheel built does not carry this checkout's stamp $want" >&2; exit 1; }
fi

if [ "$CARRY" = 1 ]; then
    "$PY" scripts/prepare_gpu_carry.py --prebuilt .gpu/prebuilt
else
    rm -rf .gpu/carry/prebuilt
    mkdir -p .gpu/carry/prebuilt
    cp .gpu/prebuilt/*.whl .gpu/prebuilt/*.whl.stamp .gpu/carry/prebuilt/
fi

commit="$(git rev-parse HEAD)"
dirty=""
[ -z "$(git status --porcelain --untracked-files=no)" ] || dirty=" (the working tree has uncommitted changes: commit first, the results name $commit)"
cat <<EOF
-- ready in $((SECONDS - start)) s; stamp $want$dirty
Device calls (ARCHITECTURE.md, "GPU plan"):
  1. run carry [".gpu/carry/prebuilt"] timeout_s 480:
     FASTBERT_COMMIT=$commit bash scripts/gpu_check.sh
  2. at once, same carry, timeout_s 300 (if status says budget_left_s < 330: GPU_CHECK_TOTAL_S=budget_left_s-60):
     GPU_CHECK_STAGES="sanitizer e2e" GPU_CHECK_TOTAL_S=270 SANITIZER_S=120 E2E_MAX_S=150 FASTBERT_COMMIT=$commit bash scripts/gpu_check.sh
  then give_back; fine-tuning later: scripts/gpu_finetune.sh with carry [".gpu/carry"].
EOF

#!/usr/bin/env bash
# One call on a GPU machine: environment, install, the GPU tests, the kernel benchmarks.
#
#   OUT=/some/dir FASTBERT_COMMIT=<sha> bash scripts/gpu_check.sh
#
# On the device machine $OUT is set by the tool; the checkout there has no .git,
# so pass the commit in FASTBERT_COMMIT (it is recorded in every benchmark row).
#
# Time budget (seconds; environment overrides), sized for a call of about 8 minutes:
#   GPU_CHECK_TOTAL_S=420   the whole script ends by then
#   INSTALL_S=150           pip install -e . (builds the CUDA extension when csrc/ has sources
#                           and nvcc is found; FASTBERT_CUDA=0 skips it)
#   GPU_TESTS_S=200         pytest -m gpu tests (GPU_TESTS_MAXFAIL=5 failures stop it; 1 acts as -x)
#   BENCH_MAX_S=300         the benchmark gets what is left, at most this (at least 60 s), in --budget
#                           mode with --time-limit so that it stops starting new case groups in time
#                           (lowest priority first: fp16, then the non-key shapes); its JSON is saved
#                           every 10 s. BENCH_COMPILE=key|none|all picks the torch.compile baselines
#                           (key shapes only by default: each costs seconds of compiling);
#                           BENCH_ARGS adds arguments (e.g. "--ops attention").
#
# Files left in $OUT (flat, 7 at most: the device tool brings back 8):
#   check.log (everything this script prints), install.log, gpu_tests.log, bench.log,
#   kernels.json, kernels.md, kernels.png
set -u -o pipefail
export PYTHONUNBUFFERED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/fastbert_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TOTAL="${GPU_CHECK_TOTAL_S:-420}"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

main() {
echo "== fastbert gpu_check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${FASTBERT_COMMIT:-unknown}, budget ${TOTAL}s"
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>/dev/null || true
"$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, L2 {p.L2_cache_size >> 20} MiB, "
          f"{p.total_memory / 2**30:.1f} GiB")
for name in ("triton", "transformers", "numpy", "pytest", "pytest-timeout", "pytest-benchmark", "matplotlib",
             "hypothesis", "safetensors", "tokenizers", "setuptools"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
EOF
command -v nvcc >/dev/null && nvcc --version | tail -n 2

# ---------------------------------------------------------------- install
echo "== install ($(elapsed)s)"
# shellcheck source=scripts/device_install.sh
source "$REPO/scripts/device_install.sh"
device_install "${INSTALL_S:-150}" || echo "IMPORT FAILED"

# ---------------------------------------------------------------- GPU tests
echo "== pytest -m gpu tests ($(elapsed)s)"
TIMEOUT_ARG=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG="--timeout=${GPU_TEST_TIMEOUT_S:-120}"
timeout -k 10 "${GPU_TESTS_S:-200}" "$PY" -m pytest -m gpu tests -q -p no:cacheprovider \
    --maxfail="${GPU_TESTS_MAXFAIL:-5}" $TIMEOUT_ARG -rfE --durations=10 >"$OUT/gpu_tests.log" 2>&1
TESTS_RC=$?
[ "$TESTS_RC" = 124 ] && echo "(pytest stopped by the ${GPU_TESTS_S:-200}s cap)" >>"$OUT/gpu_tests.log"
tail -n 40 "$OUT/gpu_tests.log"
echo "gpu tests rc=$TESTS_RC ($(elapsed)s)"

# ---------------------------------------------------------------- benchmarks
LEFT=$(( TOTAL - $(elapsed) - 20 ))
BENCH_S=$(( LEFT > ${BENCH_MAX_S:-300} ? ${BENCH_MAX_S:-300} : LEFT ))
[ "$BENCH_S" -lt 60 ] && BENCH_S=60
echo "== fastbert bench --suite kernels --budget, ${BENCH_S}s ($(elapsed)s)"
timeout -k 10 "$BENCH_S" "$PY" -m fastbert.bench --suite kernels --budget --out "$OUT" \
    --time-limit $(( BENCH_S - 45 )) --compile "${BENCH_COMPILE:-key}" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
BENCH_RC=$?
rm -f "$OUT"/*.tmp
grep -E "^(fastbert bench|ceilings|time limit|ERROR)" "$OUT/bench.log"
if [ -f "$OUT/kernels.json" ]; then
    # Rebuild table and plot from the JSON (a run stopped by `timeout` wrote only the JSON).
    [ -f "$OUT/kernels.md" ] && [ "$BENCH_RC" = 0 ] || "$PY" -m benchmarks.report "$OUT/kernels.json" --out "$OUT"
    "$PY" -m benchmarks.report "$OUT/kernels.json" --summary
else
    tail -n 30 "$OUT/bench.log"
fi
echo "== done in $(elapsed)s: install: $INSTALL; gpu tests rc=$TESTS_RC; bench rc=$BENCH_RC"
ls "$OUT"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
}

main 2>&1 | tee -a "$OUT/check.log"
exit "${PIPESTATUS[0]}"

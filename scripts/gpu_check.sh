#!/usr/bin/env bash
# One call on a GPU machine: environment, install, then the stages asked for.
#
#   OUT=/some/dir FASTBERT_COMMIT=<sha> bash scripts/gpu_check.sh
#   GPU_CHECK_STAGES="sanitizer e2e" FASTBERT_COMMIT=<sha> bash scripts/gpu_check.sh   # a second call
#
# Stages (GPU_CHECK_STAGES, default "tests bench"). The device tool returns at most 8 files from
# $OUT, and check.log and install.log are two of them: pick stages whose files fit (tests + bench 7,
# sanitizer + e2e 7, e2e + tune 8; bench + e2e would leave 10):
#   tests      pytest -m gpu tests                       -> gpu_tests.log (-v: a line per test as it ends;
#              a run the cap stops still names its failures; GPU_TESTS_FROM=FILE runs the node ids
#              that scripts/gpu_tests_left.py listed from a capped run's log instead of all)
#   bench      fastbert bench --suite kernels --budget   -> bench.log, kernels.json/.md/.png
#   sanitizer  compute-sanitizer memcheck and racecheck over scripts/sanitize_csrc.py (every csrc kernel variant)
#                                                        -> sanitizer.log
#   e2e        fastbert bench --suite e2e --budget       -> e2e.log, e2e.json/.md/.png
#   tune       benchmarks/tune_attention.py: the Triton attention tiles, candidate by candidate
#              against the defaults (kernels/RESOURCES.md says why)   -> tune.log, tune.json
#
# On the device machine $OUT is set by the tool; the checkout there has no .git,
# so pass the commit in FASTBERT_COMMIT (it is recorded in every benchmark row).
#
# Time budget (seconds; environment overrides), sized for a call of about 8 minutes:
#   GPU_CHECK_TOTAL_S=420   the whole script ends by then: each stage gets at most its cap below and
#                           at most what is left (minus 20 s); one that the total leaves less than it
#                           needs (tests, bench, e2e, tune 60 s, sanitizer 30 s) is skipped and says so (rc 1)
#   INSTALL_S=150           pip install -e . (builds the CUDA extension when csrc/ has sources
#                           and nvcc is found; FASTBERT_CUDA=0 skips it). A call that carries
#                           [".gpu/carry/prebuilt"] (prepare_gpu_carry.py --prebuilt) skips the
#                           compile when the carried wheel's stamp matches (scripts/device_install.sh)
#   GPU_TESTS_S=200         pytest -m gpu tests: with pytest-xdist (the GPU image has it), in
#                           GPU_TEST_WORKERS=8 workers that take tests one by one (--dist load: the
#                           Triton JIT compiles of one heavy file spread over the cores); without it,
#                           in GPU_TEST_SHARDS=4 parallel processes over disjoint files.
#                           GPU_TESTS_MAXFAIL=5 failures stop the run (or a shard); 1 acts as -x
#   BENCH_MAX_S=300         the benchmark gets what is left, at most this (at least 60 s), in --budget
#                           mode with --time-limit so that it stops starting new case groups in time
#                           (lowest priority first: fp16, then the non-key shapes); its JSON is saved
#                           every 10 s. BENCH_COMPILE=key|none|all picks the torch.compile baselines
#                           (key shapes only by default: each costs seconds of compiling);
#                           BENCH_ARGS adds arguments (e.g. "--ops attention").
#
#   SANITIZER_S=240         the sanitizer stage (memcheck, then racecheck)
#   E2E_MAX_S=300           the e2e benchmark, like BENCH_MAX_S (E2E_ARGS adds arguments,
#                           e.g. "--filter base-cls"; split on spaces, so no quotes inside)
#   TUNE_S=180              the tune stage (TUNE_ARGS adds arguments, e.g. "--head-dims 64 128");
#                           head_dim 64 with and without dropout is about 40 compiles
#
# Files left in $OUT (flat): check.log (everything this script prints), install.log, and
# each stage's files above (default stages: 7).
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
local name
for name in ${GPU_CHECK_STAGES:-tests bench}; do  # a misspelt stage would run nothing and exit 0
    case "$name" in
        tests|bench|sanitizer|e2e|tune) ;;
        *) echo "GPU_CHECK_STAGES: unknown stage '$name' (tests bench sanitizer e2e tune, space-separated)"
           return 2 ;;
    esac
done
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

RC=0
stage() { [[ " ${GPU_CHECK_STAGES:-tests bench} " == *" $1 "* ]]; }
left_for() {  # seconds for a stage: what is left of TOTAL (minus a margin), at most $1 (0 when nothing is)
    local left=$(( TOTAL - $(elapsed) - 20 ))
    local s=$(( left > $1 ? $1 : left ))
    echo $(( s < 0 ? 0 : s ))
}
too_short() {  # too_short STAGE SECS MIN CAP: a stage that the total leaves less than MIN seconds (and less
    # than its own CAP) is skipped, said and counted. Before, every stage got at least 60 s, past TOTAL
    # and so past the call's limit, which then cut the end of check.log.
    [ "$2" -ge "$3" ] || [ "$2" -ge "$4" ] && return 1
    echo "== $1 SKIPPED: ${2}s left of GPU_CHECK_TOTAL_S=$TOTAL, it needs ${3}s ($(elapsed)s)"
    RC=1
    return 0
}

# ---------------------------------------------------------------- GPU tests
if stage tests && ! too_short tests "$(left_for "${GPU_TESTS_S:-200}")" 60 "${GPU_TESTS_S:-200}"; then
TESTS_S=$(left_for "${GPU_TESTS_S:-200}")
# A run the cap stops gets SIGINT, not timeout's SIGTERM: pytest (xdist too) then still prints its
# summary, the names of the failures among it; SIGTERM leaves only the progress letters. With -v each
# test's line is in the log as it ends, so what the cap cut off can be listed afterwards (the GPU tests
# collect on any machine: pytest -m gpu --collect-only -q tests).
per_test() {  # the -v line of a test that ended with outcome $1 (xdist's form, then plain pytest's)
    echo "^\[gw[0-9]+\] \[ *[0-9]+%\] $1 |::.* $1( \(.*\))? +\[ *[0-9]+%\]$"
}
tally() {  # "N passed, N failed, ..." from the -v lines of a pytest log
    local outcome n said=""
    for outcome in PASSED FAILED ERROR SKIPPED XFAIL XPASS; do
        n=$(grep -cE "$(per_test "$outcome")" "$1")
        [ "$n" = 0 ] || said="${said:+$said, }$n ${outcome,,}"
    done
    echo "${said:-no test ended}"
}
TIMEOUT_ARG=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG="--timeout=${GPU_TEST_TIMEOUT_S:-120}"
TESTS_RC=0
TARGETS=(tests)
if [ -n "${GPU_TESTS_FROM:-}" ]; then  # the node ids scripts/gpu_tests_left.py listed after a capped run
    TARGETS=()
    [ -f "$GPU_TESTS_FROM" ] && mapfile -t TARGETS < <(grep -v '^[[:space:]]*$' "$GPU_TESTS_FROM")
    echo "GPU_TESTS_FROM=$GPU_TESTS_FROM: ${#TARGETS[@]} tests"
fi
if [ ${#TARGETS[@]} = 0 ]; then
echo "GPU_TESTS_FROM=$GPU_TESTS_FROM is no file of node ids: no GPU test run" | tee "$OUT/gpu_tests.log"
TESTS_RC=2
elif [ "${GPU_TEST_WORKERS:-8}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
# Triton's JIT compiles (CPU-bound, one per kernel specialisation) dominate a first GPU run, and
# most of them sit in a few files: workers that take single tests spread them over the cores.
echo "== pytest -m gpu tests, ${GPU_TEST_WORKERS:-8} xdist workers ($(elapsed)s)"
# shellcheck disable=SC2086  # TIMEOUT_ARG is empty or one word
timeout -s INT -k 10 "$TESTS_S" "$PY" -m pytest -m gpu "${TARGETS[@]}" -v -p no:cacheprovider \
    -n "${GPU_TEST_WORKERS:-8}" --dist load --maxfail="${GPU_TESTS_MAXFAIL:-5}" $TIMEOUT_ARG -rfE --durations=10 \
    >"$OUT/gpu_tests.log" 2>&1
TESTS_RC=$?
[ "$TESTS_RC" = 124 ] && echo "(stopped by the ${TESTS_S}s cap; before it: $(tally "$OUT/gpu_tests.log"))" \
    >>"$OUT/gpu_tests.log"
else
echo "== pytest -m gpu tests, ${GPU_TEST_SHARDS:-4} processes ($(elapsed)s)"
# Without xdist: N pytest processes over disjoint files use N of the machine's cores.
# Heaviest files first, dealt round-robin; every shard's log goes into gpu_tests.log.
SHARDS=${GPU_TEST_SHARDS:-4}
ORDERED=()
for f in test_cuda_layernorm test_attention test_cuda_attention test_layernorm test_gelu test_cuda_span test_span; do
    [ -f "tests/$f.py" ] && ORDERED+=("tests/$f.py")
done
for f in tests/test_*.py; do [[ " ${ORDERED[*]} " == *" $f "* ]] || ORDERED+=("$f"); done
[ "${TARGETS[*]}" = tests ] || ORDERED=("${TARGETS[@]}")  # GPU_TESTS_FROM's node ids, dealt the same way
PIDS=()
for ((i = 0; i < SHARDS; i++)); do
    FILES=()
    for ((j = i; j < ${#ORDERED[@]}; j += SHARDS)); do FILES+=("${ORDERED[j]}"); done
    [ ${#FILES[@]} -gt 0 ] || continue
    echo "shard $i: ${FILES[*]}"
    # shellcheck disable=SC2086  # TIMEOUT_ARG is empty or one word
    timeout -s INT -k 10 "$TESTS_S" "$PY" -m pytest -m gpu "${FILES[@]}" -v -p no:cacheprovider \
        --maxfail="${GPU_TESTS_MAXFAIL:-5}" $TIMEOUT_ARG -rfE --durations=5 >"$OUT/gpu_tests.$i.tmp" 2>&1 &
    PIDS+=($!)
done
for ((i = 0; i < ${#PIDS[@]}; i++)); do
    wait "${PIDS[i]}"
    rc=$?
    { echo "==== shard $i rc=$rc"; cat "$OUT/gpu_tests.$i.tmp"; } >>"$OUT/gpu_tests.log"
    [ "$rc" = 124 ] && echo "(shard $i stopped by the ${TESTS_S}s cap; before it:" \
        "$(tally "$OUT/gpu_tests.$i.tmp"))" >>"$OUT/gpu_tests.log"
    [ "$rc" = 0 ] || [ "$rc" = 5 ] || TESTS_RC=$rc   # 5: no test selected in that shard
    rm -f "$OUT/gpu_tests.$i.tmp"
done
fi
# -v gives a line per test as it ends: the summary keeps the failures and totals, not those lines.
grep -E "^==== shard|passed|failed|error|FAILED|ERROR|stopped by" "$OUT/gpu_tests.log" \
    | grep -vE "$(per_test "(PASSED|SKIPPED|XFAIL|XPASS)")" | tail -n 60
echo "gpu tests rc=$TESTS_RC ($(elapsed)s)"
[ "$TESTS_RC" = 0 ] || RC=1
fi

# ---------------------------------------------------------------- benchmarks
bench_suite() {  # bench_suite kernels|e2e MAX_S LOG EXTRA_ARGS...
    local suite="$1" max_s="$2" log="$3"
    shift 3
    local secs
    secs=$(left_for "$max_s")
    too_short "bench --suite $suite" "$secs" 60 "$max_s" && return
    echo "== fastbert bench --suite $suite --budget, ${secs}s ($(elapsed)s)"
    timeout -k 10 "$secs" "$PY" -m fastbert.bench --suite "$suite" --budget --out "$OUT" \
        --time-limit $(( secs - 45 )) "$@" >"$OUT/$log" 2>&1
    local rc=$?
    rm -f "$OUT"/*.tmp
    grep -E "^(fastbert bench|ceilings|time limit|ERROR)" "$OUT/$log"
    if [ -f "$OUT/$suite.json" ]; then
        # Rebuild table and plot from the JSON (a run stopped by `timeout` wrote only the JSON).
        [ -f "$OUT/$suite.md" ] && [ "$rc" = 0 ] || "$PY" -m benchmarks.report "$OUT/$suite.json" --out "$OUT"
        "$PY" -m benchmarks.report "$OUT/$suite.json" --summary
    else
        tail -n 30 "$OUT/$log"
    fi
    echo "bench $suite rc=$rc ($(elapsed)s)"
    [ "$rc" = 0 ] || RC=1
}
# shellcheck disable=SC2086  # BENCH_ARGS / E2E_ARGS are word lists
stage bench && bench_suite kernels "${BENCH_MAX_S:-300}" bench.log --compile "${BENCH_COMPILE:-key}" ${BENCH_ARGS:-}

# ---------------------------------------------------------------- compute-sanitizer
if stage sanitizer && ! too_short sanitizer "$(left_for "${SANITIZER_S:-240}")" 30 "${SANITIZER_S:-240}"; then
secs=$(left_for "${SANITIZER_S:-240}")
echo "== compute-sanitizer memcheck + racecheck over every csrc kernel variant, ${secs}s ($(elapsed)s)"
{
    # scripts/sanitize_csrc.py: one launch of each kernel variant at small edge shapes, forward and
    # backward, a line per case as it goes (pytest's collection and float64 references cost more
    # than the kernels under memcheck); a run cut by the cap (rc 124) still shows how far it got.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 $(( secs * 6 / 10 )) compute-sanitizer --tool memcheck \
        --error-exitcode 1 "$PY" scripts/sanitize_csrc.py
    echo "memcheck rc=$?"
    timeout -k 10 $(( secs * 4 / 10 )) compute-sanitizer --tool racecheck --racecheck-report hazard \
        --error-exitcode 1 "$PY" scripts/sanitize_csrc.py --only attention,layernorm,span
    echo "racecheck rc=$?"
} >"$OUT/sanitizer.log" 2>&1
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rc=|sanitize_csrc:|FAILED|error|Device not supported" "$OUT/sanitizer.log" | tail -n 20
# KINDS.md: on gVisor machines (the H200s) compute-sanitizer refuses the device, and every test then
# fails at its first allocation: that says nothing about the kernels.
grep -q "Device not supported" "$OUT/sanitizer.log" \
    && echo "compute-sanitizer refused this device (seen on gVisor H200 machines): no sanitizer result here," \
            "the failures above are not kernel errors"
grep -q "memcheck rc=0" "$OUT/sanitizer.log" && grep -q "racecheck rc=0" "$OUT/sanitizer.log" || RC=1
fi

# ---------------------------------------------------------------- end to end
# shellcheck disable=SC2086
stage e2e && bench_suite e2e "${E2E_MAX_S:-300}" e2e.log ${E2E_ARGS:-}

# ---------------------------------------------------------------- Triton attention tiles
if stage tune && ! too_short tune "$(left_for "${TUNE_S:-180}")" 60 "${TUNE_S:-180}"; then
secs=$(left_for "${TUNE_S:-180}")
echo "== tune_attention, ${secs}s ($(elapsed)s)"
# shellcheck disable=SC2086  # TUNE_ARGS is a word list
timeout -k 10 "$secs" "$PY" -m benchmarks.tune_attention --time-limit $(( secs - 30 )) --out "$OUT/tune.json" \
    ${TUNE_ARGS:-} >"$OUT/tune.log" 2>&1
rc=$?
sed -n '/^best per kernel/,$p' "$OUT/tune.log"
echo "tune rc=$rc ($(elapsed)s)"
[ "$rc" = 0 ] || RC=1
fi

echo "== done in $(elapsed)s: install: $INSTALL; stages: ${GPU_CHECK_STAGES:-tests bench}; rc=$RC"
ls "$OUT"
# check.log is still being written by tee: it is in the count already.
n_files=$(find "$OUT" -type f | wc -l)
[ "$n_files" -le 8 ] || echo "WARNING: $n_files files in \$OUT: the device tool brings back 8 (see the header)"
return $RC
}

main 2>&1 | tee -a "$OUT/check.log"
exit "${PIPESTATUS[0]}"

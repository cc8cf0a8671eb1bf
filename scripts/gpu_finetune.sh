#!/usr/bin/env bash
# Issue 4's GPU runs in one call: install, then fine-tune the embedded MiniLM on all of SST-2
# train and on the SQuAD articles, with fastbert "triton", fastbert "torch" and transformers
# (scripts/gpu_finetune.py), results to $OUT/finetune.json.
#
# First, here (needs ../shared/data and the embedded model package):
#     python scripts/prepare_gpu_carry.py          # -> .gpu/carry/ (git-ignored, ~50 MiB)
# Then on the device machine, with carry [".gpu/carry"]:
#     FASTBERT_COMMIT=<sha> bash scripts/gpu_finetune.sh
#
# Time (seconds; environment overrides), sized for a call of about 9 minutes:
#   FINETUNE_TOTAL_S=480   the whole script ends by then (hard cap through `timeout`)
#   INSTALL_S=120          pip install -e . (FASTBERT_CUDA=0 unless set: the runs use triton and torch)
#   FINETUNE_BUDGET_S      passed to gpu_finetune.py --budget (default: what is left, minus 30 s);
#                          with a budget SST-2 runs 1 epoch instead of 3 and each run gets a share of
#                          the time (a run that reaches it stops and is evaluated there); "full" runs
#                          without a budget (3 epochs of SST-2, 2 of SQuAD; several minutes more)
#   FINETUNE_ARGS          more arguments for gpu_finetune.py (e.g. "--tasks sst2 --impls triton torch",
#                          or "--impls cuda+compile transformers+compile transformers+fastbert": the cuda
#                          impls need FASTBERT_CUDA=1 too, else the install leaves fastbert._C out and
#                          they are recorded as skipped)
#   CARRY=.gpu/carry       the carried folder
#
# Files left in $OUT (flat, at most 8 come back): run.log (everything printed), install.log,
# finetune.json (env, data splits, what was trimmed, one record per run: wall time, tokens/s,
# metrics after each epoch).
set -u -o pipefail
export PYTHONUNBUFFERED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/fastbert_gpu_finetune_out}"   # not the --work folder below
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TOTAL="${FINETUNE_TOTAL_S:-480}"
CARRY="${CARRY:-.gpu/carry}"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

main() {
echo "== fastbert gpu_finetune, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${FASTBERT_COMMIT:-unknown}, cap ${TOTAL}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>/dev/null || echo "nvidia-smi failed"
"$PY" -c "import torch, importlib.metadata as md; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0)); \
[print(' ', n, md.version(n)) for n in ('triton', 'transformers', 'tokenizers', 'safetensors', 'tqdm')]" \
    || echo "python check failed"
if [ ! -f "$CARRY/model/model.safetensors" ] || [ ! -f "$CARRY/data/sst2/train.tsv" ]; then
    echo "error: $CARRY is missing: run 'python scripts/prepare_gpu_carry.py' on the dev machine and call" \
         "the device tool with carry [\".gpu/carry\"]"
    ls -la "$CARRY" 2>&1 | head
    return 2
fi

# ---------------------------------------------------------------- install
echo "== install ($(elapsed)s)"
# shellcheck source=scripts/device_install.sh
source "$REPO/scripts/device_install.sh"
device_install "${INSTALL_S:-120}" 0 || { echo "IMPORT FAILED"; return 3; }

# ---------------------------------------------------------------- fine-tuning
LEFT=$(( TOTAL - $(elapsed) - 30 ))
BUDGET="${FINETUNE_BUDGET_S:-$LEFT}"
BUDGET_ARG="--budget $BUDGET"
[ "$BUDGET" = "full" ] && BUDGET_ARG=""
echo "== gpu_finetune.py ${BUDGET_ARG:-(no budget)} ${FINETUNE_ARGS:-} ($(elapsed)s)"
CAP=$(( TOTAL - $(elapsed) - 5 ))
[ "$CAP" -ge 1 ] || CAP=1   # `timeout 0` would mean no cap at all, a negative one fails with 125
timeout -k 10 "$CAP" "$PY" scripts/gpu_finetune.py --carry "$CARRY" \
    --out "$OUT/finetune.json" --work /tmp/fastbert_gpu_finetune $BUDGET_ARG ${FINETUNE_ARGS:-}
RC=$?
[ "$RC" = 124 ] && echo "(stopped by the ${TOTAL}s cap: finetune.json holds the runs that finished)"
rm -f "$OUT"/*.tmp
echo "== done in $(elapsed)s: install: $INSTALL; gpu_finetune rc=$RC"
ls -la "$OUT"
return "$RC"
}

main 2>&1 | tee -a "$OUT/run.log"
exit "${PIPESTATUS[0]}"

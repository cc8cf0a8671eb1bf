"""The GPU scripts run on the CPU at toy sizes, so a crash costs no device time: the carry
folder is prepared as for the device (float16 MiniLM, the data it needs), then
scripts/gpu_finetune.py fine-tunes for a step with fastbert (bf16 autocast: the GPU default)
and with transformers, and evaluates, SST-2 and SQuAD. And scripts/device_install.sh's
choice between a carried prebuilt fastbert._C and compiling csrc/, with pip stubbed out; and
scripts/gpu_check.sh's stages (what each command is given, which return codes fail the call, what
is left in $OUT), with the GPU-only and slow commands stubbed out; and scripts/gpu_finetune.sh's
wiring around gpu_finetune.py (the carry check, the budget and arguments it passes, its return codes),
with gpu_finetune.py stubbed out."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "squad").exists(), reason="needs ../shared/data")
def test_gpu_finetune_runs_at_toy_size_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    carry, out = tmp_path / "carry", tmp_path / "finetune.json"
    prepared = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_gpu_carry.py"), "--out", str(carry)],
                              capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_finetune.py"), "--carry", str(carry),
                           "--out", str(out), "--work", str(tmp_path / "work"), "--device", "cpu",
                           "--impls", "torch", "transformers", "transformers+fastbert", "torch+compile",
                           "--compile-backend", "aot_eager", "--precision", "bf16", "--max-steps", "1",
                           "--max-train-examples", "32", "--max-dev-examples", "8", "--squad-max-len", "256",
                           "--warmup-steps", "0"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    runs = json.loads(out.read_text())["runs"]
    impls = ("torch", "transformers", "transformers+fastbert", "torch+compile")
    assert {(r["task"], r["impl"]) for r in runs} == {(t, i) for t in ("sst2", "squad") for i in impls}
    for r in runs:
        assert r["status"] == "ok" and r["precision"] == "bf16", r
        metrics = r["metrics"]
        assert ("accuracy" in metrics) if r["task"] == "sst2" else ("f1" in metrics and "exact_match" in metrics)


# Python, except that `-m pip` is only logged with the FASTBERT_CUDA it got (and succeeds):
# device_install's decisions show without installing anything.
_FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then echo "FASTBERT_CUDA=${{FASTBERT_CUDA-unset}}" >>"$PIP_LOG"; exit 0; fi
exec {python} "$@"
"""


@pytest.mark.parametrize("case", ["match", "stale", "broken", "cuda_off"])
def test_device_install_uses_a_prebuilt_extension_only_when_its_stamp_matches(tmp_path, case):
    """match: the carried wheel's module is copied into fastbert/ and pip runs with FASTBERT_CUDA=0
    (no nvcc). stale (csrc/ changed since it was built), broken (it does not load) and cuda_off
    (the extension not wanted, as in gpu_finetune.sh): pip builds as before, nothing is copied."""
    spec = importlib.util.find_spec("fastbert._C")
    if spec is None:
        pytest.skip("fastbert._C is not built here: no module to carry")
    repo, prebuilt, out = tmp_path / "repo", tmp_path / "prebuilt", tmp_path / "out"
    shutil.copytree(REPO / "csrc", repo / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "fastbert").mkdir()
    prebuilt.mkdir()
    out.mkdir()
    module = Path(spec.origin).read_bytes() if case != "broken" else b"not an ELF file"
    wheel = prebuilt / "fastbert_kernels-0.1.0-cp3-cp3-manylinux_2_34_x86_64.whl"  # as build_wheels.py --prebuilt leaves it
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fastbert/__init__.py", "")
        zf.writestr(f"fastbert/{Path(spec.origin).name}", module)
    stamp = subprocess.run([sys.executable, "csrc/build_ext.py", "stamp"], cwd=repo, capture_output=True, text=True,
                           check=True).stdout
    wheel.with_name(wheel.name + ".stamp").write_text(stamp)
    if case == "stale":
        with open(repo / "csrc" / "fastbert.h", "a") as header:
            header.write("// an edit after the module was built\n")
    python = tmp_path / "python"
    python.write_text(_FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    build_switches = ("FASTBERT_CUDA", "FASTBERT_CUDA_ARCH", "FASTBERT_NVCC_FLAGS")
    env = {k: v for k, v in os.environ.items() if k not in build_switches}
    env.update(REPO=str(repo), OUT=str(out), PY=str(python), PIP_LOG=str(tmp_path / "pip.log"),
               FASTBERT_PREBUILT=str(prebuilt))
    cuda_default = "0" if case == "cuda_off" else ""
    done = subprocess.run(["bash", "-c", f'source "{REPO}/scripts/device_install.sh"; '
                           f'device_install 60 {cuda_default}; echo "INSTALL=$INSTALL"'],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    log = (out / "install.log").read_text()
    installs = (tmp_path / "pip.log").read_text().split()
    chosen = [line for line in done.stdout.splitlines() if line.startswith("INSTALL=")]
    copied = list((repo / "fastbert").glob("_C*.so"))
    context = f"{done.stdout}\n{done.stderr}\ninstall.log:\n{log}"
    if case == "match":
        assert installs == ["FASTBERT_CUDA=0"], context
        assert [(p.name, p.read_bytes()) for p in copied] == [(Path(spec.origin).name, module)], context
        assert chosen and "prebuilt wheel" in chosen[0] and wheel.name in log, context
    else:
        assert installs == (["FASTBERT_CUDA=0"] if case == "cuda_off" else ["FASTBERT_CUDA=unset"]), context
        assert not copied, context
        assert chosen and "prebuilt" not in chosen[0], context
        reason = {"stale": "matches this checkout", "broken": "does not load here", "cuda_off": None}[case]
        assert reason is None or reason in log, context


_FAKE_SANITIZER = """#!/usr/bin/env bash
echo "========= COMPUTE-SANITIZER"
echo "========= Error: Device not supported"
exit 1
"""


def test_gpu_check_names_a_refused_sanitizer(tmp_path):
    """gpu_check.sh's sanitizer stage where compute-sanitizer refuses the device (KINDS.md: the gVisor
    H200 machines): the summary must say so, not leave a bare 'memcheck rc=1' to be read as a kernel
    error. compute-sanitizer is a stub (nvidia-smi may be missing: the script goes on without it);
    the install is the PYTHONPATH fallback."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "compute-sanitizer").write_text(_FAKE_SANITIZER)
    (bin_dir / "compute-sanitizer").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), PYTHON=sys.executable,
               GPU_CHECK_STAGES="sanitizer", GPU_CHECK_INSTALL="shim", GPU_CHECK_TOTAL_S="200", SANITIZER_S="60",
               TMPDIR=str(tmp_path))  # the shim install's mktemp folder goes with the test's
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 1, context
    assert "memcheck rc=1" in done.stdout and "racecheck rc=1" in done.stdout, context
    assert "compute-sanitizer refused this device" in done.stdout, context
    assert "Device not supported" in (out / "sanitizer.log").read_text()


# gpu_check.sh's other stages on the CPU: the shell around pytest, `fastbert bench`, benchmarks.report and
# benchmarks/tune_attention.py (what each is given, which return code counts, what is left in $OUT),
# checked here because a slip there costs a call of scarce device time. Python is the stub below.

# Python as gpu_check.sh and gpu_finetune.sh call it, with what needs a GPU or takes seconds replaced:
# the environment reports and the install's import check (the sanitizer test above runs those for
# real; the check takes $STUB_IMPORT_S seconds, as importing torch and triton does, and fails with the
# error $STUB_IMPORT_FAILS where one is given), the probes for pytest plugins (present: the words of
# $STUB_MODULES), `-m pytest` (its run's rc is N where a "FILE=N" of $STUB_PYTEST_RC names one of its
# arguments; N=hang sleeps), `-m fastbert.bench` (it leaves the files $STUB_BENCH_WRITES names, prints
# $STUB_BENCH_SAYS last, ends with $STUB_BENCH_RC) and scripts/gpu_finetune.py (it prints to stdout
# and stderr, writes its --out and ends with $STUB_FINETUNE_RC; hang: it is stopped while it saves
# again, leaving the .tmp it writes before the rename). Everything else, benchmarks.report and
# tune_attention included, is the real Python. Every `-m` call's and script's argv is recorded in
# $STUB_CALLS, stubbed or not.
_STUB_PYTHON = """#!/usr/bin/env bash
case "$1" in -m | scripts/*.py) printf '%s\\0' "$@" >"$STUB_CALLS/$(date +%s%N).$$" ;; esac
case "$1 $2" in
"- ")
    cat >/dev/null
    echo "python (stub: no environment report)"
    exit 0 ;;
"-c import torch, "*)
    echo "torch (stub: no environment report)"
    exit 0 ;;
"-c import fastbert, "*)
    sleep "${{STUB_IMPORT_S:-0}}"
    if [ -n "${{STUB_IMPORT_FAILS:-}}" ]; then
        echo "Traceback (most recent call last):" >&2
        echo "$STUB_IMPORT_FAILS" >&2
        exit 1
    fi
    echo "fastbert (stub: no import check)"
    exit 0 ;;
"scripts/gpu_finetune.py "*)
    args=("$@")
    for ((i = 0; i + 1 < ${{#args[@]}}; i++)); do [ "${{args[i]}}" = --out ] && out="${{args[i + 1]}}"; done
    echo "sst2 triton: epoch 1/1, dev accuracy 0.912 (stub)"
    echo "train: 100%|##########| 2105/2105 (stub progress bar, on stderr)" >&2
    echo '{{"runs": [{{"task": "sst2", "impl": "triton", "status": "ok"}}]}}' >"$out"
    if [ "${{STUB_FINETUNE_RC:-0}}" = hang ]; then
        echo '{{"runs": [' >"${{out%.json}}.tmp"
        exec sleep 30
    fi
    exit "${{STUB_FINETUNE_RC:-0}}" ;;
"-c import xdist" | "-c import pytest_timeout")
    [[ " ${{STUB_MODULES:-}} " == *" ${{2#import }} "* ]]
    exit ;;
"-m pytest")
    rc=0 xdist=0
    for arg in "$@"; do
        [ "$arg" = -n ] && xdist=1
        for planted in ${{STUB_PYTEST_RC:-}}; do [ "$arg" = "${{planted%=*}}" ] && rc="${{planted#*=}}"; done
    done
    ended() {{  # a test's -v line, in xdist's form or plain pytest's
        if [ "$xdist" = 1 ]; then echo "[gw1] [ 50%] $1 $2 "; else printf '%-70s [ 50%%]\n' "$2 $1${{3:+ ($3)}}"; fi
    }}
    failure="FAILED tests/test_attention.py::test_fwd[bfloat16] - AssertionError: max error 3.1e-02"
    case "$rc" in
        0) ended PASSED "tests/test_attention.py::test_fwd[float16]"
           ended SKIPPED "tests/test_cuda_attention.py::test_bad_input_error[cuda]" "needs a GPU with bf16"
           echo "12 passed, 3 skipped in 4.21s" ;;
        5) echo "15 deselected in 0.52s" ;;
        hang)  # pytest stopped by SIGINT still prints its summary; SIGTERM kills it where it is
           ended PASSED "tests/test_attention.py::test_fwd[float16]"
           ended FAILED "tests/test_attention.py::test_fwd[bfloat16]"
           sleep 60 &
           trap 'kill $!; echo "$failure"; echo "!!! KeyboardInterrupt !!!"; echo "1 failed, 1 passed in 1.02s"; exit 2' INT
           wait
           exit 0 ;;
        *) ended FAILED "tests/test_attention.py::test_fwd[bfloat16]"
           echo "$failure"
           echo "1 failed, 11 passed in 4.02s" ;;
    esac
    exit "$rc" ;;
"-m fastbert.bench")
    args=("$@")
    for ((i = 0; i + 1 < ${{#args[@]}}; i++)); do
        case "${{args[i]}}" in --suite) suite="${{args[i + 1]}}" ;; --out) out="${{args[i + 1]}}" ;; esac
    done
    echo "fastbert bench: budget run of $suite on NVIDIA H100 80GB HBM3 (torch 2.13.0+cu128, triton 3.6.0," \\
         "commit $FASTBERT_COMMIT) -> $out"
    echo "ceilings: copy 3018.4 GB/s, matmul 701.22 TFLOP/s (8192x8192x8192 bfloat16)"
    for leaves in ${{STUB_BENCH_WRITES:-}}; do
        case "$leaves" in
            json) cp "$STUB_RESULTS/$suite.json" "$out/$suite.json" ;;
            tmp) cp "$STUB_RESULTS/$suite.json" "$out/$suite.tmp" ;;  # a save the kill cut short
            md) echo "stub table, as fastbert bench wrote it" >"$out/$suite.md" ;;
            png) echo "stub plot, as fastbert bench drew it" >"$out/$suite.png" ;;
        esac
    done
    echo "${{STUB_BENCH_SAYS:-}}"
    exit "${{STUB_BENCH_RC:-0}}" ;;
esac
exec {python} "$@"
"""

_H100 = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "570.124.06", "torch": "2.13.0+cu128", "triton": "3.6.0",
         "cuda": "12.8", "commit": "0123456789ab"}
_CEILINGS = {"copy_GBps": 3018.4, "copy_bytes": 1 << 30, "matmul_TFLOPs": 701.2,
             "matmul_shape": "8192x8192x8192 bfloat16"}


def _bench_results(suite: str) -> dict:
    """A results JSON as `fastbert bench --budget` saves it on an H100 (benchmarks/harness.py's row
    format), cut to one key case: kernels, attention fwd+bwd against eager and SDPA; e2e, a BERT-base
    fine-tuning step against transformers eager."""
    def row(impl, ms, eager_ms, **extra):
        tflops = extra.pop("work") / (ms * 1e9)
        return {"impl": impl, "dtype": "bfloat16", "status": "ok", "note": "", "unit": "TFLOP/s", "tier": 1,
                "ms": ms, "ms_p20": 0.99 * ms, "ms_p80": 1.01 * ms, "reps": 40, "host_us": None,
                "first_call_s": 0.8, "metric": tflops, "pct_of_ceiling": 100 * tflops / _CEILINGS["matmul_TFLOPs"],
                "speedup_vs_eager": eager_ms / ms, "peak_mib": 900.0, "utc": "2026-11-27T10:00:00Z", **_H100,
                **extra}

    if suite == "kernels":
        case = dict(op="attention", shape="base B16 S512 H12 D64 nomask", mode="fwd+bwd", work=1.24e11,
                    dims={"B": 16, "S": 512, "H": 12, "D": 64, "mask": "none"})
        rows = [row(impl, ms, 2.9, **case, speedup_vs={"eager": 2.9 / ms, "sdpa_best": 0.47 / ms})
                for impl, ms in (("triton", 0.41), ("eager", 2.9), ("sdpa_flash", 0.47))]
    else:
        case = dict(op="base-cls", shape="B8 S512", mode="train", work=2.2e12, tokens=4096, padded_tokens=4096,
                    dims={"B": 8, "S": 512, "layers": 12, "hidden": 768, "head": "cls", "autocast": True})
        rows = []
        for impl, ms in (("hf_eager", 61.0), ("fb_triton", 35.0)):
            r = row(impl, ms, 61.0, **case, speedup_vs_hf_compile=None, max_abs_diff=None)
            rows.append(dict(r, tokens_per_s=4096 / (ms / 1e3), mfu_pct=r["pct_of_ceiling"]))
    meta = {"suite": suite, "profile": "budget", "compile_scope": "key", "started_utc": "2026-11-27T10:00:00Z"}
    return {"env": _H100, "ceilings": _CEILINGS, "settings": {}, "meta": meta, "skipped_for_time": [], "rows": rows}


# The script's own settings: none may leak in from the environment of the test run.
_GPU_CHECK_SETTINGS = ("GPU_CHECK_", "GPU_TEST", "INSTALL_S", "BENCH_", "E2E_", "TUNE_", "SANITIZER_S",
                       "FASTBERT_COMMIT", "FASTBERT_CUDA")
_INSTALL_SHIM = "install: fallback: PYTHONPATH + fastbert.kernels alias (see install.log)"


def _stub_python(tmp_path) -> tuple[Path, Path]:
    """(the stub Python, the folder where it records its calls), in tmp_path."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    for folder in (bin_dir, calls):
        folder.mkdir()
    python = bin_dir / "python"
    python.write_text(_STUB_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    return python, calls


def _recorded_calls(calls) -> list[list[str]]:
    return [p.read_text().split("\0")[:-1] for p in sorted(calls.iterdir(), key=lambda p: p.name)]


def _gpu_check(tmp_path, **settings):
    """(run, $OUT, `-m` and script calls in order) of gpu_check.sh with the stub Python, the shim install and
    `settings` (the script's and the stub's) as its environment."""
    python, calls = _stub_python(tmp_path)
    out, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    for suite in ("kernels", "e2e"):
        (results / f"{suite}.json").write_text(json.dumps(_bench_results(suite), indent=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(_GPU_CHECK_SETTINGS)}
    env.update(OUT=str(out), PYTHON=str(python), GPU_CHECK_INSTALL="shim", FASTBERT_COMMIT="0123456789ab",
               STUB_CALLS=str(calls), STUB_RESULTS=str(results), TMPDIR=str(tmp_path), **settings)
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    return done, out, _recorded_calls(calls)


def _module_calls(calls, module):
    return [call[2:] for call in calls if call[1] == module]


def _stage_seconds(stdout, title) -> tuple[int, int]:
    """(seconds given to the stage, seconds elapsed when it started), from its '== TITLE, Ns (Ms)' line."""
    found = re.search(rf"^== {re.escape(title)}, (\d+)s \((\d+)s\)$", stdout, re.M)
    assert found, f"no '== {title}' line in:\n{stdout}"
    return int(found[1]), int(found[2])


def _done(stdout) -> tuple[int, str]:
    """(seconds elapsed, the rest) of the script's one '== done in Ns: ...' line (both scripts end so)."""
    found = re.findall(r"^== done in (\d+)s: (.*)$", stdout, re.M)
    assert len(found) == 1, stdout
    return int(found[0][0]), found[0][1]


def test_gpu_check_default_call_runs_pytest_in_xdist_workers_and_the_kernel_benchmark(tmp_path):
    """The default call (stages "tests bench") where all goes well: pytest -m gpu in 8 xdist workers
    that take tests one by one, with the plugin's per-test timeout; the kernel benchmark in --budget
    mode with BENCH_ARGS split into words, for BENCH_MAX_S (less than what is left), told to stop
    starting groups 45 s before its cap; its own table kept (no rebuild) and the key-shape summary
    printed. Exit 0, the done line, and the 7 files the header promises in $OUT, check.log holding all
    that was printed."""
    done, out, calls = _gpu_check(tmp_path, STUB_MODULES="xdist pytest_timeout", BENCH_MAX_S="100",
                                  BENCH_ARGS="--ops attention", STUB_BENCH_WRITES="json md png")
    context = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, context
    assert _done(done.stdout)[1] == f"{_INSTALL_SHIM}; stages: tests bench; rc=0", context
    assert _module_calls(calls, "pytest") == [
        ["-m", "gpu", "tests", "-v", "-p", "no:cacheprovider", "-n", "8", "--dist", "load", "--maxfail=5",
         "--timeout=120", "-rfE", "--durations=10"]], context
    assert "12 passed, 3 skipped" in done.stdout and "gpu tests rc=0" in done.stdout, context
    # each test's -v line stays in the log; the summary printed leaves out those of tests that did not fail
    log = (out / "gpu_tests.log").read_text()
    assert "[gw1] [ 50%] SKIPPED tests/test_cuda_attention.py::test_bad_input_error[cuda]" in log, log
    assert "test_fwd[float16]" not in done.stdout and "test_bad_input_error" not in done.stdout, context
    assert _stage_seconds(done.stdout, "fastbert bench --suite kernels --budget")[0] == 100, context
    assert _module_calls(calls, "fastbert.bench") == [
        ["--suite", "kernels", "--budget", "--out", str(out), "--time-limit", "55", "--compile", "key",
         "--ops", "attention"]], context
    assert "fastbert bench: budget run of kernels" in done.stdout and "ceilings: copy" in done.stdout, context
    assert _module_calls(calls, "benchmarks.report") == [[str(out / "kernels.json"), "--summary"]], context
    assert (out / "kernels.md").read_text() == "stub table, as fastbert bench wrote it\n"
    assert "| attention | base B16 S512 H12 D64 nomask | bfloat16 | fwd+bwd |" in done.stdout, context
    assert "bench kernels rc=0" in done.stdout, context
    assert sorted(p.name for p in out.iterdir()) == ["bench.log", "check.log", "gpu_tests.log", "install.log",
                                                     "kernels.json", "kernels.md", "kernels.png"]
    assert (out / "check.log").read_text() == done.stdout


@pytest.mark.parametrize("case", ["a shard fails", "a shard has no gpu test", "a shard passes the cap"])
def test_gpu_check_sharded_tests_fail_only_for_a_shard_that_failed(tmp_path, case):
    """Without xdist (or with GPU_TEST_WORKERS=1): GPU_TEST_SHARDS pytest processes over disjoint files
    that together are every tests/test_*.py, the heaviest dealt first; every shard's output and rc in
    gpu_tests.log, no shard's temporary log left. A shard that fails fails the call; one that selects no
    test (pytest's rc 5: a file without gpu tests) does not; one stopped by GPU_TESTS_S says so and fails."""
    settings = {"a shard fails": dict(STUB_MODULES="", STUB_PYTEST_RC="tests/test_attention.py=1"),
                "a shard has no gpu test": dict(STUB_MODULES="xdist pytest_timeout", GPU_TEST_WORKERS="1",
                                                STUB_PYTEST_RC="tests/test_attention.py=5"),
                "a shard passes the cap": dict(STUB_MODULES="pytest_timeout", GPU_TESTS_S="1",
                                               STUB_PYTEST_RC="tests/test_attention.py=hang")}[case]
    done, out, calls = _gpu_check(tmp_path, GPU_CHECK_STAGES="tests", GPU_TEST_SHARDS="3", **settings)
    context = (done.stdout + done.stderr)[-6000:]
    log = (out / "gpu_tests.log").read_text()
    shards = {int(m[1]): m[2].split() for m in re.finditer(r"^shard (\d+): (.*)$", done.stdout, re.M)}
    every_file = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    assert sorted(shards) == [0, 1, 2] and sorted(sum(shards.values(), [])) == every_file, context
    assert max(map(len, shards.values())) - min(map(len, shards.values())) <= 1, shards
    assert [files[0] for _, files in sorted(shards.items())] == \
        ["tests/test_cuda_layernorm.py", "tests/test_attention.py", "tests/test_cuda_attention.py"], shards
    pytest_calls = _module_calls(calls, "pytest")
    assert sorted(call[2:call.index("-v")] for call in pytest_calls) == sorted(shards.values()), pytest_calls
    with_timeout = "pytest_timeout" in settings["STUB_MODULES"]
    for call in pytest_calls:
        assert call[:2] == ["-m", "gpu"] and "-n" not in call and "--maxfail=5" in call, call
        assert ("--timeout=120" in call) == with_timeout, call
    rc = {"a shard fails": 1, "a shard has no gpu test": 5, "a shard passes the cap": 124}[case]
    assert re.findall(r"^==== shard (\d) rc=(\d+)$", log, re.M) == [("0", "0"), ("1", str(rc)), ("2", "0")], log
    assert log.count("12 passed, 3 skipped") == 2, log
    assert "test_bad_input_error[cuda] SKIPPED (needs a GPU with bf16)" in log, log
    assert "test_bad_input_error" not in done.stdout, context  # a line of a test that did not fail
    shard_1_says = {1: "1 failed, 11 passed", 5: "15 deselected",
                    124: "(shard 1 stopped by the 1s cap; before it: 1 passed, 1 failed)"}[rc]
    assert shard_1_says in log, log
    if rc != 5:  # the summary printed from the log shows what went wrong, the failure's name too
        assert shard_1_says in done.stdout, context
        assert "FAILED tests/test_attention.py::test_fwd[bfloat16] - AssertionError" in done.stdout, context
    tests_rc = 0 if rc == 5 else rc
    assert f"gpu tests rc={tests_rc} (" in done.stdout, context
    assert done.returncode == (0 if tests_rc == 0 else 1), context
    assert _done(done.stdout)[1] == f"{_INSTALL_SHIM}; stages: tests; rc={done.returncode}", context
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "gpu_tests.log", "install.log"]


def test_gpu_check_tests_stopped_by_the_cap_still_name_their_failures(tmp_path):
    """The first `pytest -m gpu` may not fit its cap. The cap sends SIGINT, on which pytest (xdist too)
    prints its summary before it exits; SIGTERM, timeout's default, kills it with only the progress
    letters written, so a failure would go unnamed (both seen with pytest 9.2 and xdist 3.8 on a file
    of one failing and six 3-second tests cut at 5 s). The stub prints its summary on SIGINT only. What
    the -v lines show had ended before the cap is counted in the log and in what the call prints."""
    done, out, calls = _gpu_check(tmp_path, GPU_CHECK_STAGES="tests", STUB_MODULES="xdist pytest_timeout",
                                  GPU_TESTS_S="1", STUB_PYTEST_RC="tests=hang")
    context = (done.stdout + done.stderr)[-6000:]
    log = (out / "gpu_tests.log").read_text()
    assert len(_module_calls(calls, "pytest")) == 1, calls
    assert "(stopped by the 1s cap; before it: 1 passed, 1 failed)" in log, log
    assert "1 failed, 1 passed in 1.02s" in log and "KeyboardInterrupt" in log, log
    for said in ("(stopped by the 1s cap; before it: 1 passed, 1 failed)",
                 "FAILED tests/test_attention.py::test_fwd[bfloat16] - AssertionError", "gpu tests rc=124 ("):
        assert said in done.stdout, context
    assert done.returncode == 1, context


# What the next call runs after a capped one: scripts/gpu_tests_left.py lists the GPU tests the log shows
# no end for; gpu_check.sh runs that list (GPU_TESTS_FROM). The log lines are pytest 9.2's -v forms,
# xdist 3.8's first, as read from real runs (the cap test above says which).
_LEFT_LOG = """bringing up nodes...
[gw0] [ 12%] FAILED tests/test_attention.py::test_gpu_bert_size[0.0-dtype0] \n\
[gw1] [ 25%] PASSED tests/test_attention.py::test_gpu_bert_size[0.0-dtype1] \n\
tests/test_span.py::test_gpu_topk[20] SKIPPED (no bf16 here)                     [ 37%]
tests/test_span.py::test_gpu_topk[32] ERROR                                      [ 50%]
FAILED tests/test_attention.py::test_gpu_bert_size[0.0-dtype0] - AssertionError: max error 3.1e-02
PASSED tests/test_span.py::test_gpu_nothing_ended_this - a summary line, not a test's
"""
_LEFT_COLLECTED = ["tests/test_attention.py::test_gpu_bert_size[0.0-dtype0]",
                   "tests/test_attention.py::test_gpu_bert_size[0.0-dtype1]",
                   "tests/test_attention.py::test_gpu_bert_size[0.1-dtype0]",
                   "tests/test_span.py::test_gpu_topk[20]", "tests/test_span.py::test_gpu_topk[32]",
                   "tests/test_span.py::test_gpu_nothing_ended_this"]


def _gpu_tests_left():
    spec = importlib.util.spec_from_file_location("gpu_tests_left", REPO / "scripts" / "gpu_tests_left.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_tests_left_lists_what_the_log_shows_no_end_for(tmp_path, capsys):
    """Every test line of either -v form counts as ended, summary lines do not; what is left keeps the
    collection's order; --with-failed adds the failures and errors; a log without a test line is refused."""
    left = _gpu_tests_left()
    assert left.ended_tests(_LEFT_LOG) == {
        "tests/test_attention.py::test_gpu_bert_size[0.0-dtype0]": "FAILED",
        "tests/test_attention.py::test_gpu_bert_size[0.0-dtype1]": "PASSED",
        "tests/test_span.py::test_gpu_topk[20]": "SKIPPED", "tests/test_span.py::test_gpu_topk[32]": "ERROR"}
    log, collected, out = tmp_path / "gpu_tests.log", tmp_path / "collected.txt", tmp_path / "left.txt"
    log.write_text(_LEFT_LOG)
    collected.write_text("\n".join(_LEFT_COLLECTED) + "\n")
    assert left.main([str(log), "--collected", str(collected), "--out", str(out)]) == 0
    assert out.read_text().split() == [_LEFT_COLLECTED[2], _LEFT_COLLECTED[5]]
    assert "6 GPU tests collected; the log ended 4 (1 passed, 1 failed, 1 error, 1 skipped); 2 left" \
        in capsys.readouterr().err
    assert left.main([str(log), "--collected", str(collected), "--with-failed"]) == 0
    assert capsys.readouterr().out.split() == [_LEFT_COLLECTED[i] for i in (0, 2, 4, 5)]
    log.write_text("12 passed in 3.1s\n")
    assert left.main([str(log), "--collected", str(collected)]) == 1


def test_gpu_tests_left_reads_real_pytest_output(tmp_path):
    """Against pytest itself: the GPU tests' collection here (they collect without a GPU), and the -v
    lines of a real run that was stopped part way (-x after a failure) are read as what ended."""
    left = _gpu_tests_left()
    collected = left.collected_gpu_tests()
    assert len(collected) > 100 and all("::" in node for node in collected), collected[:5]
    assert "tests/test_attention.py::test_gpu_bert_size[0.0-dtype0]" in collected
    (tmp_path / "test_probe.py").write_text("import pytest\n"
                                            "@pytest.mark.parametrize('i', [1, 2])\ndef test_a(i): pass\n"
                                            "def test_b(): pytest.skip('why')\n"
                                            "@pytest.mark.xfail(reason='known')\ndef test_c(): assert 0\n"
                                            "def test_d(): assert 0\ndef test_e(): pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-x", "-p", "no:cacheprovider", "test_probe.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout
    assert left.ended_tests(run.stdout) == {"test_probe.py::test_a[1]": "PASSED", "test_probe.py::test_a[2]": "PASSED",
                                            "test_probe.py::test_b": "SKIPPED", "test_probe.py::test_c": "XFAIL",
                                            "test_probe.py::test_d": "FAILED"}, run.stdout


@pytest.mark.parametrize("workers", ["xdist", "shards"])
def test_gpu_check_runs_the_tests_gpu_tests_from_lists(tmp_path, workers):
    """GPU_TESTS_FROM=FILE: pytest gets the file's node ids (blank lines dropped) in place of `tests`, all
    of them, in xdist workers or dealt over the shards; a missing or empty file runs nothing and fails."""
    ids = [_LEFT_COLLECTED[2], "", _LEFT_COLLECTED[5], "tests/test_layernorm.py::test_gpu_rows[4096-x y]"]
    (tmp_path / "left.txt").write_text("\n".join(ids) + "\n")
    settings = dict(GPU_CHECK_STAGES="tests", GPU_TESTS_FROM=str(tmp_path / "left.txt"),
                    **(dict(STUB_MODULES="xdist") if workers == "xdist" else dict(STUB_MODULES="", GPU_TEST_SHARDS="2")))
    done, out, calls = _gpu_check(tmp_path, **settings)
    context = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0 and "3 tests" in done.stdout, context
    pytest_calls = _module_calls(calls, "pytest")
    given = [call[2:call.index("-v")] for call in pytest_calls]
    assert sorted(sum(given, [])) == sorted(i for i in ids if i), given
    assert len(given) == (1 if workers == "xdist" else 2), given
    (tmp_path / "blank.txt").write_text("\n \n")
    for stale in ("blank.txt", "missing.txt"):
        run_dir = tmp_path / Path(stale).stem
        run_dir.mkdir()
        done, out, calls = _gpu_check(run_dir, **dict(settings, GPU_TESTS_FROM=str(tmp_path / stale)))
        assert done.returncode == 1 and not _module_calls(calls, "pytest"), done.stdout
        assert "no GPU test run" in done.stdout and "gpu tests rc=2" in done.stdout, done.stdout


_BENCH_OUTCOMES = {  # what `fastbert bench` leaves, what it prints last, its rc
    "killed by its cap": dict(STUB_BENCH_WRITES="json tmp", STUB_BENCH_RC="124",
                              STUB_BENCH_SAYS="attention  triton  base B16 S512 H12 D64 nomask  bfloat16  fwd"),
    "a kernel failed": dict(STUB_BENCH_WRITES="json md png", STUB_BENCH_RC="1",
                            STUB_BENCH_SAYS="ERROR attention triton base B16 S512 H12 D64 nomask bfloat16 fwd+bwd: "
                                            "RuntimeError: CUDA error: an illegal memory access was encountered"),
    "no JSON": dict(STUB_BENCH_WRITES="", STUB_BENCH_RC="1",
                    STUB_BENCH_SAYS="RuntimeError: CUDA error: no kernel image is available for execution"),
}


@pytest.mark.parametrize("outcome", list(_BENCH_OUTCOMES))
def test_gpu_check_rebuilds_the_benchmark_table_unless_the_run_ended_well(tmp_path, outcome):
    """A benchmark that did not end with rc 0 fails the call. Its table and plot are rebuilt from the JSON
    by benchmarks.report (for real): after a kill only the JSON was written (and a save's .tmp, removed
    here); after a kernel error the table was written but the JSON is what counts. Without a JSON there
    is nothing to report: the log's tail says why. With the default BENCH_MAX_S the benchmark gets what
    is left of GPU_CHECK_TOTAL_S less a 20 s margin."""
    done, out, calls = _gpu_check(tmp_path, GPU_CHECK_STAGES="bench", GPU_CHECK_TOTAL_S="200",
                                  **_BENCH_OUTCOMES[outcome])
    context = (done.stdout + done.stderr)[-6000:]
    rc = _BENCH_OUTCOMES[outcome]["STUB_BENCH_RC"]
    secs, started_at = _stage_seconds(done.stdout, "fastbert bench --suite kernels --budget")
    assert secs + started_at in (180, 181), context  # the second may tick between left_for and the line
    assert _module_calls(calls, "fastbert.bench") == [
        ["--suite", "kernels", "--budget", "--out", str(out), "--time-limit", str(secs - 45), "--compile", "key"]]
    assert f"bench kernels rc={rc} (" in done.stdout, context
    assert done.returncode == 1, context
    assert _done(done.stdout)[1] == f"{_INSTALL_SHIM}; stages: bench; rc=1", context
    left = sorted(p.name for p in out.iterdir())
    if outcome == "no JSON":
        assert _module_calls(calls, "benchmarks.report") == [], context
        assert _BENCH_OUTCOMES[outcome]["STUB_BENCH_SAYS"] in done.stdout, context
        assert left == ["bench.log", "check.log", "install.log"]
        return
    kernels_json = str(out / "kernels.json")
    assert _module_calls(calls, "benchmarks.report") == [[kernels_json, "--out", str(out)],
                                                         [kernels_json, "--summary"]], context
    assert (out / "kernels.md").read_text().startswith("# Kernel benchmarks"), context
    assert (out / "kernels.png").read_bytes().startswith(b"\x89PNG"), context
    assert "| attention | base B16 S512 H12 D64 nomask | bfloat16 | fwd+bwd |" in done.stdout, context
    if outcome == "a kernel failed":
        assert "ERROR attention triton" in done.stdout, context
    assert left == ["bench.log", "check.log", "install.log", "kernels.json", "kernels.md", "kernels.png"]


def test_gpu_check_e2e_and_tune_stages(tmp_path):
    """The second call's stages, e2e and tune, each capped at 60 s (E2E_MAX_S, TUNE_S) with time left
    over: each gets its cap, less its margin in --time-limit (45 s for the benchmark, 30 s for tune).
    e2e: `fastbert bench --suite e2e` with E2E_ARGS split into words and no --compile, its own table
    kept, the e2e summary and issue 6's e2e targets printed by benchmarks.report (no kernels.json in
    $OUT). tune: the real benchmarks/tune_attention.py, --quick through TUNE_ARGS (Triton's
    interpreter), its 'best per kernel' block printed and tune.json left."""
    done, out, calls = _gpu_check(tmp_path, GPU_CHECK_STAGES="e2e tune", GPU_CHECK_TOTAL_S="300", E2E_MAX_S="60",
                                  TUNE_S="60", E2E_ARGS="--filter base-cls", TUNE_ARGS="--quick --dropout 0",
                                  STUB_BENCH_WRITES="json md png")
    context = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, context
    assert _done(done.stdout)[1] == f"{_INSTALL_SHIM}; stages: e2e tune; rc=0", context
    assert _stage_seconds(done.stdout, "fastbert bench --suite e2e --budget")[0] == 60, context
    assert _stage_seconds(done.stdout, "tune_attention")[0] == 60, context
    assert _module_calls(calls, "fastbert.bench") == [
        ["--suite", "e2e", "--budget", "--out", str(out), "--time-limit", "15", "--filter", "base-cls"]], context
    assert _module_calls(calls, "benchmarks.report") == [[str(out / "e2e.json"), "--summary"]], context
    assert (out / "e2e.md").read_text() == "stub table, as fastbert bench wrote it\n"
    assert "| base-cls | B8 S512 | train |" in done.stdout, context
    assert "| BERT-base fine-tuning step, S512, vs transformers eager | base-cls B8 S512 train" in done.stdout
    assert "bench e2e rc=0" in done.stdout, context
    assert _module_calls(calls, "benchmarks.tune_attention") == [
        ["--time-limit", "30", "--out", str(out / "tune.json"), "--quick", "--dropout", "0"]], context
    best = done.stdout[done.stdout.index("best per kernel"):done.stdout.index("tune rc=0")]
    assert [line.split()[:3] for line in best.splitlines()[1:4]] == [["D16", "p=0", kernel]
                                                                       for kernel in ("fwd", "bwd_dq", "bwd")], best
    assert {r["kernel"] for r in json.loads((out / "tune.json").read_text())["rows"]} == {"fwd", "bwd_dq", "bwd"}
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "e2e.json", "e2e.log", "e2e.md", "e2e.png",
                                                     "install.log", "tune.json", "tune.log"]
    assert "WARNING" not in done.stdout, "8 files all come back"


def test_gpu_check_skips_a_stage_the_total_leaves_too_little_time_and_says_so(tmp_path):
    """GPU_CHECK_TOTAL_S=30 leaves 10 s after the 20 s margin: e2e and tune (60 s each at least) are
    skipped, named and counted (rc 1), and nothing runs past the total. Before, each got a 60 s floor
    past the total, so past the call's timeout_s, which then cut the end of check.log."""
    done, out, calls = _gpu_check(tmp_path, GPU_CHECK_STAGES="e2e tune", GPU_CHECK_TOTAL_S="30")
    context = (done.stdout + done.stderr)[-6000:]
    assert re.search(r"== bench --suite e2e SKIPPED: \d+s left of GPU_CHECK_TOTAL_S=30, it needs 60s", done.stdout), context
    assert re.search(r"== tune SKIPPED: \d+s left of GPU_CHECK_TOTAL_S=30, it needs 60s", done.stdout), context
    assert _module_calls(calls, "fastbert.bench") == [] and _module_calls(calls, "benchmarks.tune_attention") == []
    assert done.returncode == 1 and _done(done.stdout)[1] == f"{_INSTALL_SHIM}; stages: e2e tune; rc=1", context


def test_gpu_check_refuses_an_unknown_stage_before_installing(tmp_path):
    """"sanitizer,e2e" (a comma) or a misspelt name ran no stage and exited 0."""
    done, out, calls = _gpu_check(tmp_path, GPU_CHECK_STAGES="sanitizer,e2e")
    assert done.returncode == 2, done.stdout[-3000:]
    assert "GPU_CHECK_STAGES: unknown stage 'sanitizer,e2e'" in done.stdout
    assert "== install" not in done.stdout and not calls


def test_gpu_check_warns_when_its_files_will_not_all_come_back(tmp_path):
    """bench + e2e leave 10 files in $OUT and the device tool brings back 8: the call's own output
    (which the tool returns whatever happens to the files) must say so."""
    done, out, _ = _gpu_check(tmp_path, GPU_CHECK_STAGES="bench e2e", STUB_BENCH_WRITES="json md png")
    assert len(list(out.iterdir())) == 10
    assert "WARNING: 10 files in $OUT: the device tool brings back 8" in done.stdout, done.stdout[-3000:]


def test_gpu_check_fails_when_tune_fails(tmp_path):
    """A tune run that fails (here for real: TUNE_ARGS that tune_attention.py refuses) fails the call,
    and its rc is shown; there is no 'best per kernel' block to show."""
    done, out, _ = _gpu_check(tmp_path, GPU_CHECK_STAGES="tune", TUNE_ARGS="--dtype float64")
    context = (done.stdout + done.stderr)[-6000:]
    assert "tune rc=2 (" in done.stdout and "best per kernel" not in done.stdout, context
    assert "invalid choice: 'float64'" in (out / "tune.log").read_text()
    assert done.returncode == 1, context
    assert _done(done.stdout)[1] == f"{_INSTALL_SHIM}; stages: tune; rc=1", context


# gpu_finetune.sh on the CPU: the shell around scripts/gpu_finetune.py (the carry check, the install, the
# budget, arguments and hard cap it is given, its return code, what is left in $OUT), with the stub
# Python above, for the same reason: a slip there costs a call of scarce device time.

_FINETUNE_SETTINGS = ("FINETUNE_", "CARRY", "INSTALL_S", "GPU_CHECK_", "FASTBERT_COMMIT", "FASTBERT_CUDA")
_CARRIED = ("model/model.safetensors", "data/sst2/train.tsv")  # the two files gpu_finetune.sh checks


def _gpu_finetune(tmp_path, carry_files=_CARRIED, carry_at=".gpu/carry", **settings):
    """(run, $OUT, gpu_finetune.py's argv for each time it ran) of gpu_finetune.sh with the stub Python,
    the shim install and `settings` (the script's and the stub's) as its environment. The script runs
    from a bare checkout in tmp_path (it and device_install.sh copied there), so that its default carry,
    .gpu/carry, is the test's (this checkout's may hold a prepared one); `carry_files` (empty files: the
    stub reads none) are put in `carry_at`, relative to that checkout."""
    python, calls = _stub_python(tmp_path)
    repo, out = tmp_path / "repo", tmp_path / "out"
    (repo / "scripts").mkdir(parents=True)
    for script in ("gpu_finetune.sh", "device_install.sh"):
        shutil.copy(REPO / "scripts" / script, repo / "scripts" / script)
    for name in carry_files:
        (repo / carry_at / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / carry_at / name).write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FINETUNE_SETTINGS)}
    # TMPDIR: the shim install's mktemp folder goes with the test's, not into /tmp for good.
    env.update(OUT=str(out), PYTHON=str(python), GPU_CHECK_INSTALL="shim", FASTBERT_COMMIT="0123456789ab",
               STUB_CALLS=str(calls), TMPDIR=str(tmp_path), **settings)
    done = subprocess.run(["bash", str(repo / "scripts" / "gpu_finetune.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    runs = [call[1:] for call in _recorded_calls(calls) if call[0] == "scripts/gpu_finetune.py"]
    return done, out, runs


def _finetune_line(stdout) -> tuple[str, int]:
    """(what the '== gpu_finetune.py ... (Ns)' line says it passes, N: seconds elapsed when it was printed)."""
    found = re.search(r"^== gpu_finetune\.py (.*) \((\d+)s\)$", stdout, re.M)
    assert found, f"no '== gpu_finetune.py' line in:\n{stdout}"
    return found[1].strip(), int(found[2])


_WORK = "/tmp/fastbert_gpu_finetune"  # gpu_finetune.py's scratch folder, as the script gives it


@pytest.mark.parametrize("missing", ["the folder", "the model", "the SST-2 train split"])
def test_gpu_finetune_stops_with_2_when_the_carry_is_missing(tmp_path, missing):
    """A call made without carry [".gpu/carry"] (or with a carry prepared before the model or the data
    was added) must stop before the install with rc 2 and say what to do, not spend its minutes on an
    install and a gpu_finetune.py that fails to load: either file missing is enough."""
    carried = {"the folder": (), "the model": _CARRIED[1:], "the SST-2 train split": _CARRIED[:1]}[missing]
    done, out, runs = _gpu_finetune(tmp_path, carry_files=carried)
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 2, context
    assert "error: .gpu/carry is missing: run 'python scripts/prepare_gpu_carry.py'" in done.stdout, context
    assert runs == [] and "== install" not in done.stdout, context
    assert sorted(p.name for p in out.iterdir()) == ["run.log"]
    assert (out / "run.log").read_text() == done.stdout


def test_gpu_finetune_default_call_gives_gpu_finetune_py_what_is_left_less_30_s(tmp_path):
    """The default call: the install (here 2 s of import check) counts against FINETUNE_TOTAL_S, and
    gpu_finetune.py gets the carry, its output in $OUT, the scratch folder and --budget of what is left
    less 30 s (the margin for its last save and the script's end), and no other argument. It ends with
    gpu_finetune.py's rc 0; $OUT holds the three files the header names, run.log all that was printed,
    gpu_finetune.py's stderr (its progress bars) included."""
    done, out, runs = _gpu_finetune(tmp_path, FINETUNE_TOTAL_S="100", STUB_IMPORT_S="2")
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, context
    passed, started_at = _finetune_line(done.stdout)
    assert started_at >= 2, context  # else "what is left" cannot be told from FINETUNE_TOTAL_S - 30
    budget = int(passed.removeprefix("--budget "))
    assert budget + started_at in (70, 71), context  # the second may tick between the budget and the line
    assert runs == [["--carry", ".gpu/carry", "--out", str(out / "finetune.json"), "--work", _WORK,
                     "--budget", str(budget)]], context
    assert _done(done.stdout)[1] == f"{_INSTALL_SHIM}; gpu_finetune rc=0", context
    assert sorted(p.name for p in out.iterdir()) == ["finetune.json", "install.log", "run.log"]
    assert json.loads((out / "finetune.json").read_text())["runs"][0]["status"] == "ok"
    assert "stub progress bar, on stderr" in done.stdout and done.stderr == "", context
    assert (out / "run.log").read_text() == done.stdout


@pytest.mark.parametrize("budget", ["200", "full"])
def test_gpu_finetune_passes_the_budget_and_the_arguments_it_is_given(tmp_path, budget):
    """FINETUNE_BUDGET_S replaces the computed budget; "full" passes none (gpu_finetune.py's full
    epochs), and the line before the run says so. FINETUNE_ARGS are split into words (each its own
    argument to gpu_finetune.py), after the budget."""
    done, out, runs = _gpu_finetune(tmp_path, FINETUNE_BUDGET_S=budget,
                                    FINETUNE_ARGS="--tasks sst2 --impls triton torch")
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, context
    budget_args = ["--budget", budget] if budget != "full" else []
    assert runs == [["--carry", ".gpu/carry", "--out", str(out / "finetune.json"), "--work", _WORK, *budget_args,
                     "--tasks", "sst2", "--impls", "triton", "torch"]], context
    said = "--budget 200" if budget != "full" else "(no budget)"
    assert _finetune_line(done.stdout)[0] == f"{said} --tasks sst2 --impls triton torch", context


def test_gpu_finetune_reads_the_carry_from_CARRY(tmp_path):
    """CARRY names the carried folder in place of .gpu/carry (absent here): it is the one checked and
    the one given to gpu_finetune.py."""
    carried = tmp_path / "carried elsewhere"  # a space: the path must stay one argument
    done, out, runs = _gpu_finetune(tmp_path, carry_at=carried, CARRY=str(carried))
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, context
    assert not (tmp_path / "repo" / ".gpu").exists()
    assert [run[:2] for run in runs] == [["--carry", str(carried)]], context


@pytest.mark.parametrize("rc", [1, 2])
def test_gpu_finetune_exits_with_gpu_finetune_py_rc(tmp_path, rc):
    """gpu_finetune.py's rc (1: a run raised; 2: arguments it refused) is the call's, through tee, and
    the done line shows it; what it printed is in run.log."""
    done, out, runs = _gpu_finetune(tmp_path, STUB_FINETUNE_RC=str(rc))
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == rc, context
    assert len(runs) == 1 and _done(done.stdout)[1].endswith(f"; gpu_finetune rc={rc}"), context
    assert "sst2 triton: epoch 1/1" in (out / "run.log").read_text()


def test_gpu_finetune_stopped_by_its_cap_says_so_and_exits_124(tmp_path):
    """A gpu_finetune.py that overruns (here it hangs while it saves) is stopped by `timeout` 5 s before
    FINETUNE_TOTAL_S, so that the script ends within it; the call says that finetune.json holds the runs
    that finished, removes the .tmp the cut save left (the device tool brings back few files) and exits
    with timeout's 124."""
    total = 8
    done, out, runs = _gpu_finetune(tmp_path, FINETUNE_TOTAL_S=str(total), STUB_FINETUNE_RC="hang")
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 124, context
    assert f"(stopped by the {total}s cap: finetune.json holds the runs that finished)" in done.stdout, context
    seconds, rest = _done(done.stdout)
    assert seconds < total and rest.endswith("; gpu_finetune rc=124"), context
    assert len(runs) == 1, context
    assert sorted(p.name for p in out.iterdir()) == ["finetune.json", "install.log", "run.log"]


def test_gpu_finetune_with_no_time_left_still_caps_the_run(tmp_path):
    """FINETUNE_TOTAL_S=3 is spent before gpu_finetune.py starts (the install takes 2 s): the cap left
    would be 0 (to `timeout`, no cap at all) or below; the run still gets a cap of its own and is
    stopped by it, with rc 124, instead of running as long as it likes."""
    done, out, runs = _gpu_finetune(tmp_path, FINETUNE_TOTAL_S="3", STUB_IMPORT_S="2", STUB_FINETUNE_RC="hang")
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 124 and len(runs) == 1, context
    assert _done(done.stdout)[0] < 10, context


def test_gpu_finetune_stops_with_3_when_the_install_does_not_import(tmp_path):
    """An install after which fastbert does not import (here the shim's import check fails as it does
    on an image without triton) stops the call with rc 3 and "IMPORT FAILED", the import error shown,
    before gpu_finetune.py would fail the same way in each of its runs."""
    error = "ModuleNotFoundError: No module named 'triton'"
    done, out, runs = _gpu_finetune(tmp_path, STUB_IMPORT_FAILS=error)
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 3, context
    assert error in done.stdout and _INSTALL_SHIM in done.stdout, context
    assert done.stdout.rstrip().endswith("IMPORT FAILED"), context
    assert runs == [], context
    assert sorted(p.name for p in out.iterdir()) == ["install.log", "run.log"]


@pytest.mark.parametrize("args, env, message", [
    (["--carry"], {}, "unknown argument --carry"),
    ([], {"PYTHON312": sys.executable}, "need a Python 3.12"),
])
def test_gpu_prep_refuses_before_building(args, env, message):
    """scripts/gpu_prep.sh (run for real at stop 23: 72 s once .venv was made) stops with 2 and says why
    on a bad argument or an interpreter other than the GPU image's 3.12, before make or any build."""
    if env.get("PYTHON312") and sys.version_info[:2] == (3, 12):
        pytest.skip("this Python is a 3.12")
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_prep.sh"), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
    assert "ready in" not in done.stdout

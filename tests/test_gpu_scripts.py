"""The GPU scripts run on the CPU at toy sizes, so a crash costs no device time: the carry
folder is prepared as for the device (float16 MiniLM, the data it needs), then
scripts/gpu_finetune.py fine-tunes for a step with fastbert (bf16 autocast: the GPU default)
and with transformers, and evaluates, SST-2 and SQuAD. And scripts/device_install.sh's
choice between a carried prebuilt fastbert._C and compiling csrc/, with pip stubbed out."""
import importlib.util
import json
import os
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
    wheel = prebuilt / "fastbert-0.1.0-cp3-cp3-manylinux_2_34_x86_64.whl"  # as build_wheels.py --prebuilt leaves it
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
               GPU_CHECK_STAGES="sanitizer", GPU_CHECK_INSTALL="shim", GPU_CHECK_TOTAL_S="200", SANITIZER_S="60")
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    context = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 1, context
    assert "memcheck rc=1" in done.stdout and "racecheck rc=1" in done.stdout, context
    assert "compute-sanitizer refused this device" in done.stdout, context
    assert "Device not supported" in (out / "sanitizer.log").read_text()

"""Every Triton kernel compiles for a real GPU (sm_90), not only under the interpreter.

The CPU tests run the kernels through TRITON_INTERPRET=1, which accepts code the
compiler rejects and cannot run bfloat16 at all. tests/triton_aot.py records the
launches each launcher makes with its GPU tiles (fake CUDA tensors, nothing runs)
and compiles each distinct one ahead of time, float16, bfloat16 and float32.
The full set (all head dims and hidden sizes, sm_80 and sm_90) is
`python tests/triton_aot.py`; the suite runs the --quick set for sm_90.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU

SCRIPT = Path(__file__).with_name("triton_aot.py")


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile every kernel for real")
def test_every_kernel_compiles_for_hopper(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a warm cache would skip the compiler
    resources = tmp_path / "resources.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--arch", "90", "--resources", str(resources)],
                          env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas for ahead-of-time compilation")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "compiled 0 of" not in done.stdout
    compiled = set(done.stdout.split("kernels: ", 1)[1].splitlines()[0].split(", "))
    import fastbert.kernels.attention as KA, fastbert.kernels.gelu as KG, fastbert.kernels.layernorm as KL
    import fastbert.kernels.span as KS
    every = {name for module in (KA, KG, KL, KS) for name in vars(module) if name.endswith("_kernel")}
    assert compiled == every, f"never launched, so never compiled: {sorted(every - compiled)}"
    # ptxas's resources were read back for every compiled launch (registers > 0 in each row)
    rows = [line.split("|") for line in resources.read_text().splitlines() if line.startswith("| 90 |")]
    assert {row[2].strip() for row in rows} == every
    assert all(int(row[6]) > 0 for row in rows)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile every kernel for real")
def test_attention_fits_the_shared_memory_of_an_rtx_or_l4(tmp_path):
    """sm_89 (RTX 40, L4, L40S; sm_86 and sm_120 alike) gives a program 99 KB of shared memory. The
    half-precision attention tiles past head_dim 64 took up to 104 KB there (136 KB on sm_90), which
    Triton refuses at launch; triton_aot.py records each target's launches with its limit and fails
    a kernel past it (seen failing with the sm_90 tiles)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", "89", "--dtypes", "float16", "bfloat16",
                           "--head-dims", "128", "--only", "_attention_"], env=env, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas for ahead-of-time compilation")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "compiled 0 of" not in done.stdout and "for sm_89" in done.stdout


SEED_PROBE = """
import sys, torch
sys.path.insert(0, {tests!r})
import triton_aot as A
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import JITFunction
recorder = A.Recorder()
JITFunction.run = lambda self, *a, **kw: recorder(self, *a, **kw)
A.KA._max_shared = lambda device: A.SHARED_LIMIT[90]   # no GPU to ask
counts = []
with FakeTensorMode():
    q, k, v = (torch.zeros(2, 64, 2, 64, dtype=torch.float16, device="cuda") for _ in range(3))
    for seed in (7, 16, 1, 2**31 - 16):
        out, lse = A.KA.attention_fwd(q, k, v, None, None, None, 0.1, None, seed)
        A.KA.attention_bwd(torch.zeros_like(out), q, k, v, out, torch.zeros(2, 2, 64), None, None, None, 0.1, None,
                           seed)
        counts.append(len(A.distinct(recorder.launches)))
print(counts)
"""


@pytest.mark.skipif(ON_GPU, reason="runs the launchers on fake CUDA tensors")
def test_a_new_dropout_seed_never_compiles_a_new_kernel():
    """Seeds change every call. The JIT specialises an int argument on its value (1, divisible by 16):
    unless the kernels opt out, the first seed divisible by 16 compiles new variants mid-training."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SEED_PROBE.format(tests=str(SCRIPT.parent))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = eval(done.stdout.strip().splitlines()[-1])
    assert counts == [counts[0]] * 4, f"distinct (kernel, specialisation) after seeds 7, 16, 1, 2**31-16: {counts}"

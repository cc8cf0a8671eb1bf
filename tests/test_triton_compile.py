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
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas for ahead-of-time compilation")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "compiled 0 of" not in done.stdout
    compiled = set(done.stdout.split("kernels: ", 1)[1].splitlines()[0].split(", "))
    import fastbert.kernels.attention as KA, fastbert.kernels.gelu as KG, fastbert.kernels.layernorm as KL
    import fastbert.kernels.span as KS
    every = {name for module in (KA, KG, KL, KS) for name in vars(module) if name.endswith("_kernel")}
    assert compiled == every, f"never launched, so never compiled: {sorted(every - compiled)}"

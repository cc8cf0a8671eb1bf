"""LayerNorm-family benchmark: add_layernorm, layernorm_gelu and bias_gelu.

Rows N = B * S = 32 * 512 = 16384 tokens; hidden 384 / 768 / 1024 (MiniLM,
BERT-base, BERT-large) for the LayerNorm ops, intermediate 1536 / 3072 / 4096
for bias_gelu. Weights and biases have x's dtype. eps = 1e-12 (BERT).

Work (GB/s): the fewest bytes an implementation must move, e = element size,
parameters (hidden or features long) counted once per read or write:
    add_layernorm   fwd: read x, residual; write y                  3*N*H*e + 2*H*e
                    bwd: read dy and the output y (x_hat = (y - bias) / weight);
                         write one gradient (dx == dresidual)       3*N*H*e + 3*H*e
    layernorm_gelu  fwd: read x; write y                            2*N*H*e + 2*H*e
                    bwd: read dy, x; write dx                       3*N*H*e + 4*H*e
    bias_gelu       fwd: read x; write y                            2*N*F*e + F*e
                    bwd: read dy, x; write dx                       3*N*F*e + 2*F*e
    add_layernorm_amp  add_layernorm as a BERT layer meets it under autocast: x a Linear's
                    half output (e = 2), residual, weight, bias and y float32, and y
                    once more in half precision for the next Linear (the cast autocast
                    would make there), each output with its own upstream gradient
                    fwd: read x, residual; write y, y's half copy   (2+4+4+2)*N*H + 8*H
                    bwd: read dy, the copy's gradient, y (fp32);
                         write dresidual (fp32), dx (half)          (4+2+4+4+2)*N*H + 12*H
fwd+bwd is the sum. The saved row statistics (8 bytes a row) are left out.
fastbert's add_layernorm kernels recompute the sum from x and residual in the backward
rather than read y (4*N*H*e; 18 bytes an element under amp), so on these counts their
backward reaches at most 75% of the copy bandwidth (amp: 89%) and fwd+bwd at most 86%
(amp: 93%), against issue 6's 85% target.

Implementations: triton / cuda (fastbert.ops on that backend), eager (the
*_ref functions, imported) and compile (torch.compile of the same reference).
add_layernorm_amp runs each of them inside torch.autocast and returns (y, y in x's
dtype): the kernels take the half/fp32 mix as it is and write both outputs in one pass;
the eager reference promotes x, as transformers' residual add, then casts y.
"""
from __future__ import annotations

import pytest
import torch

from . import harness
from fastbert.ops import add_layernorm, bias_gelu, layernorm_gelu, use_backend
from fastbert.ops.gelu import bias_gelu_ref
from fastbert.ops.layernorm import add_layernorm_ref, layernorm_gelu_ref

ROWS = 32 * 512
EPS = 1e-12
HIDDEN = (384, 768, 1024)
FEATURES = (1536, 3072, 4096)
KEY = {"add_layernorm": 768, "add_layernorm_amp": 768, "layernorm_gelu": 768, "bias_gelu": 3072}
QUICK = {"add_layernorm": (64, 64), "add_layernorm_amp": (64, 64), "layernorm_gelu": (64, 64),
         "bias_gelu": (64, 128)}   # (rows, width)


def bytes_moved(op: str, n: int, width: int, e: int, mode: str) -> float:
    fwd, bwd = {
        "add_layernorm": (3 * n * width * e + 2 * width * e, 3 * n * width * e + 3 * width * e),
        "add_layernorm_amp": (12 * n * width + 8 * width, 16 * n * width + 12 * width),
        "layernorm_gelu": (2 * n * width * e + 2 * width * e, 3 * n * width * e + 4 * width * e),
        "bias_gelu": (2 * n * width * e + width * e, 3 * n * width * e + 2 * width * e),
    }[op]
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# op -> (public function, reference, which inputs get gradients)
def _add_layernorm(x, residual, weight, bias):
    return add_layernorm(x, residual, weight, bias, EPS)


def _add_layernorm_ref(x, residual, weight, bias):
    return add_layernorm_ref(x, residual, weight, bias, EPS)


def _layernorm_gelu(x, weight, bias):
    return layernorm_gelu(x, weight, bias, EPS)


def _layernorm_gelu_ref(x, weight, bias):
    return layernorm_gelu_ref(x, weight, bias, EPS)


def _add_layernorm_amp(x, residual, weight, bias):
    """Inside torch.autocast in x's dtype (a Linear's output's): (y, y in x's dtype)."""
    with torch.autocast(x.device.type, dtype=x.dtype):
        return add_layernorm(x, residual, weight, bias, EPS, copy_in_x_dtype=True)


def _add_layernorm_amp_ref(x, residual, weight, bias):
    with torch.autocast(x.device.type, dtype=x.dtype):
        y = add_layernorm_ref(x, residual, weight, bias, EPS)
        return y, y.to(x.dtype)


OPS = {
    "add_layernorm": (_add_layernorm, _add_layernorm_ref, (0, 1, 2, 3)),
    "add_layernorm_amp": (_add_layernorm_amp, _add_layernorm_amp_ref, (0, 1, 2, 3)),
    "layernorm_gelu": (_layernorm_gelu, _layernorm_gelu_ref, (0, 1, 2)),
    "bias_gelu": (bias_gelu, bias_gelu_ref, (0, 1)),
}


def make_inputs_fn(op, n, width, dtype, device, seed):
    """make_inputs(k): set k, seeded. Never zeros; weights near 1 as a trained LayerNorm's are.
    add_layernorm_amp: x in `dtype`, everything else float32."""
    rest_dtype = torch.float32 if op == "add_layernorm_amp" else dtype

    def make_inputs(k):
        g = torch.Generator(device=device).manual_seed(seed + k)

        def randn(*shape, scale=1.0, shift=0.0, dtype=rest_dtype):
            return (torch.randn(*shape, device=device, generator=g) * scale + shift).to(dtype)
        x = randn(n, width, dtype=dtype)
        if op == "bias_gelu":
            return x, randn(width, scale=0.1)
        weight, bias = randn(width, scale=0.1, shift=1.0), randn(width, scale=0.1)
        if op.startswith("add_layernorm"):
            return x, randn(n, width), weight, bias
        return x, weight, bias
    return make_inputs


def _on(backend, fn):
    def run(*args):
        with use_backend(backend):
            return fn(*args)
    return run


def cases(profile: str, cfg: harness.Settings, compile_scope: str = "key") -> list[harness.Case]:
    device = cfg.device
    quick = profile == "quick"
    dtypes = [torch.bfloat16 if device.type == "cuda" else torch.float32] if quick else [torch.bfloat16, torch.float16]
    out = []
    for run_dtype in dtypes:
        for op, (public, ref, grad_idx) in OPS.items():
            dtype = run_dtype
            if op == "add_layernorm_amp" and dtype == torch.float32:
                dtype = torch.float16  # autocast's mix needs a half x (quick runs on the CPU are float32)
            widths = [QUICK[op][1]] if quick else (FEATURES if op == "bias_gelu" else HIDDEN)
            n = QUICK[op][0] if quick else ROWS
            for width in widths:
                key = quick or width == KEY[op]
                first_dtype = run_dtype == dtypes[0]
                impls = harness.kernel_rows(device, lambda backend: _on(backend, public))
                impls["eager"] = (ref, "ok", f"{ref.__name__.lstrip('_')} from fastbert.ops")
                if compile_scope == "all" or (compile_scope == "key" and key and first_dtype):
                    impls["compile"] = (harness.compiled(ref, cfg.compile_backend), "ok",
                                        f"torch.compile({ref.__name__.lstrip('_')}, backend={cfg.compile_backend})")
                label = f"N{n} {'F' if op == 'bias_gelu' else 'H'}{width}"
                make_inputs = make_inputs_fn(op, n, width, dtype, device, seed=7 * width + len(op))
                for mode in ("fwd", "fwd+bwd", "bwd"):
                    tier = 1 if key and first_dtype and mode != "bwd" else 2 if first_dtype else 3
                    for impl, (fn, status, note) in impls.items():
                        out.append(harness.Case(
                            op=op, impl=impl, label=label, shape={"N": n, "width": width},
                            dtype=dtype, mode=mode, fn=fn, make_inputs=make_inputs,
                            work=bytes_moved(op, n, width, torch.empty((), dtype=dtype).element_size(), mode),
                            unit=harness.GBPS, grad_idx=grad_idx, tier=tier, status=status, note=note))
    return out


# ----------------------------------------------------------------------------- pytest-benchmark entry

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["triton", "cuda", "eager", "compile"])
@pytest.mark.parametrize("op", list(OPS))
def test_layernorm_family(benchmark, op, impl, mode):
    found = [c for c in cases("budget", harness.Settings.make(torch.device("cuda")), compile_scope="key")
             if c.op == op and c.impl == impl and c.mode == mode and c.dtype == torch.bfloat16 and c.tier == 1]
    if not found:
        pytest.skip(f"{impl} is not available here")
    harness.pytest_benchmark(benchmark, found[0])

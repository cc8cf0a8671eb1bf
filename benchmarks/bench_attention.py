"""Attention benchmark: fastbert (triton, cuda) against eager, torch.compile and each SDPA backend.

Shapes: BERT-base (H=12, D=64) and BERT-large (H=16, D=64) at S=128 (B=64),
384 (B=32) and 512 (B=16); MiniLM-style D=32 (H=12) and D=128 (H=8) at S=512;
each without a mask and with a padding mask whose lengths are drawn uniformly
from [S/4, S] (the same mask for every implementation).

Work (TFLOP/s), the standard flash-attention count over the padded length:
    forward   4 * B * H * S^2 * D    (QK^T and PV, 2 FLOPs per multiply-add)
    backward  2.5x forward           (QK^T recomputed, dV, dP, dQ, dK: 5 products)
    fwd+bwd   3.5x forward
Padding is not discounted, so a kernel that skips padded key blocks does less
work than counted; every implementation is divided by the same number.

Implementations: triton / cuda (fastbert.ops.attention on that backend), eager
(attention_ref, imported), compile (torch.compile of attention_ref), and
sdpa_flash / sdpa_efficient / sdpa_cudnn / sdpa_math (torch SDPA pinned to one
backend with sdpa_kernel, on (B, H, S, D) views of the same (B, S, H, D) tensors,
as transformers calls it). The flash backend takes no attn_mask (pytorch
#107884): masked cases record "unsupported".
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from fastbert.ops import attention, available_backends, use_backend
from fastbert.ops.attention import attention_ref

OP = "attention"

# (model, B, S, H, D)
SHAPES = [
    ("base", 64, 128, 12, 64), ("base", 32, 384, 12, 64), ("base", 16, 512, 12, 64),
    ("large", 64, 128, 16, 64), ("large", 32, 384, 16, 64), ("large", 16, 512, 16, 64),
    ("minilm", 16, 512, 12, 32), ("d128", 16, 512, 8, 128),
]
KEY_SHAPE = ("base", 16, 512, 12, 64)
QUICK_SHAPE = ("tiny", 2, 32, 2, 32)


def flops(B: int, S: int, H: int, D: int, mode: str) -> float:
    fwd = 4.0 * B * H * S * S * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def make_inputs_fn(B, S, H, D, masked, dtype, device, seed):
    """make_inputs(k) -> (q, k, v, mask): set k, seeded; mask (B, S) bool, True = real token."""
    def make_inputs(k):
        g = torch.Generator(device=device).manual_seed(seed + k)
        q, kk, v = (torch.randn(B, S, H, D, dtype=dtype, device=device, generator=g) for _ in range(3))
        mask = None
        if masked:
            lengths = torch.randint(S // 4, S + 1, (B,), device=device, generator=g)
            mask = torch.arange(S, device=device)[None, :] < lengths[:, None]
        return q, kk, v, mask
    return make_inputs


def _fastbert(backend):
    def fn(q, k, v, mask):
        with use_backend(backend):
            return attention(q, k, v, mask)
    return fn


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, mask):
        bias = None if mask is None else mask[:, None, None, :]     # (B, 1, 1, S), True = attend
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=bias)    # (B, H, S, D)
        return out.transpose(1, 2)                                   # (B, S, H, D)
    return fn


def _impls(device, masked, compile_here, cfg):
    """name -> (fn or None, status, note)."""
    from torch.nn.attention import SDPBackend

    usable = available_backends(device)
    impls = {
        "triton": (_fastbert("triton"), "ok", "") if "triton" in usable else
                  (None, "skipped", "triton backend not usable here (needs CUDA or TRITON_INTERPRET=1)"),
    }
    if "cuda" in usable:
        impls["cuda"] = (_fastbert("cuda"), "ok", "")
    impls["eager"] = (attention_ref, "ok", "fastbert.ops.attention.attention_ref")
    if compile_here:
        impls["compile"] = (harness.compiled(attention_ref, cfg.compile_backend), "ok",
                            f"torch.compile(attention_ref, backend={cfg.compile_backend})")
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_math", SDPBackend.MATH)):
        if device.type != "cuda" and name != "sdpa_math":
            impls[name] = (None, "skipped", "CUDA-only SDPA backend")
        elif name == "sdpa_flash" and masked:
            impls[name] = (None, "unsupported", "SDPA flash backend takes no attn_mask (pytorch #107884)")
        else:
            impls[name] = (_sdpa(backend), "ok", "")
    return impls


def cases(profile: str, cfg: harness.Settings, compile_scope: str = "key") -> list[harness.Case]:
    """profile: "quick" (one tiny shape, every mode), "budget" or "full"."""
    device = cfg.device
    if profile == "quick":
        shapes, dtypes, modes = [QUICK_SHAPE], [torch.bfloat16 if device.type == "cuda" else torch.float32], \
            ("fwd", "bwd", "fwd+bwd")
    else:
        shapes, dtypes = SHAPES, [torch.bfloat16, torch.float16]
        modes = ("fwd", "fwd+bwd", "bwd") if profile == "full" else ("fwd", "fwd+bwd")
    out = []
    for dtype in dtypes:
        for shape in shapes:
            model, B, S, H, D = shape
            key = shape in (KEY_SHAPE, QUICK_SHAPE)
            for masked in (False, True):
                make_inputs = make_inputs_fn(B, S, H, D, masked, dtype, device, seed=1000 * S + 10 * H + D)
                label = f"{model} B{B} S{S} H{H} D{D} {'pad' if masked else 'nomask'}"
                compile_here = compile_scope == "all" or (compile_scope == "key" and key and dtype == dtypes[0])
                for mode in modes:
                    tier = 1 if key and dtype == dtypes[0] and mode != "bwd" else \
                        2 if dtype == dtypes[0] and mode != "bwd" else 3 if mode != "bwd" else 4
                    for impl, (fn, status, note) in _impls(device, masked, compile_here, cfg).items():
                        out.append(harness.Case(
                            op=OP, impl=impl, label=label,
                            shape={"B": B, "S": S, "H": H, "D": D, "mask": "pad" if masked else "none"},
                            dtype=dtype, mode=mode, fn=fn, make_inputs=make_inputs,
                            work=flops(B, S, H, D, mode), unit=harness.TFLOPS, grad_idx=(0, 1, 2),
                            tier=tier, status=status, note=note,
                            rotate=False))  # compute-bound: L2 residency changes little
    return out


# ----------------------------------------------------------------------------- pytest-benchmark entry

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "pad"])
@pytest.mark.parametrize("impl", ["triton", "eager", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"])
def test_attention(benchmark, impl, masked, mode):
    found = [c for c in cases("budget", harness.Settings.make(torch.device("cuda")), compile_scope="none")
             if c.impl == impl and c.mode == mode and c.dtype == torch.bfloat16
             and c.shape["mask"] == ("pad" if masked else "none") and c.tier == 1]
    if not found:
        pytest.skip(f"{impl} is not available here")
    harness.pytest_benchmark(benchmark, found[0])

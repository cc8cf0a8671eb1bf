"""Attention benchmark: fastbert (triton, cuda) against eager, torch.compile and each SDPA backend.

Shapes: BERT-base (H=12, D=64) and BERT-large (H=16, D=64) at S=128 (B=64),
384 (B=32) and 512 (B=16); MiniLM-style D=32 (H=12) and D=128 (H=8) at S=512;
each without a mask and with a padding mask (the same mask for every
implementation) whose lengths are real where a real set exists for that padded
length: at S=128 SST-2 sentences ("pad-sst2", run_glue's default padding to 128),
at S=384 SQuAD v1.1 windows ("pad-squad", run_qa's max length 384), both drawn
from benchmarks/data/*_lengths.txt; at S=512, uniform in [S/4, S] ("pad-unif").

Work (TFLOP/s), the standard flash-attention count over the real tokens:
    forward   4 * H * D * sum_b s_b^2   (QK^T and PV, 2 FLOPs per multiply-add;
                                         s_b = row b's real length, S without a mask: 4 * B * H * S^2 * D)
    backward  2.5x forward              (QK^T recomputed, dV, dP, dQ, dK: 5 products)
    fwd+bwd   3.5x forward
Padding is not work (as in bench_e2e.flops): an implementation that computes the
padded positions gets no credit for them, and MFU stays below 100% for one that
skips them. Every implementation of a case is divided by the same number. The
mask (its lengths) is the same in every input set of a case; q, k, v differ.

Implementations: triton / cuda (fastbert.ops.attention on that backend), eager
(attention_ref, imported), compile (torch.compile of attention_ref), and
sdpa_flash / sdpa_efficient / sdpa_cudnn / sdpa_math (torch SDPA pinned to one
backend with sdpa_kernel, on (B, H, S, D) views of the same (B, S, H, D) tensors,
as transformers calls it). The flash backend takes no attn_mask (pytorch
#107884): masked cases record "unsupported". triton_fa2d / cuda_fa2d (at
RESIDUAL_COST_SHAPES only): the same kernels with FlashAttention-2's
D_i = rowsum(dO * O) from the rounded O, i.e. without the output residual
attention() keeps for training since stop 15 (kernels/attention.py): the ratio
to triton / cuda is what that precision costs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from . import harness
from fastbert.ops import attention, use_backend
from fastbert.ops.attention import attention_ref

OP = "attention"

# (model, B, S, H, D)
SHAPES = [
    ("base", 64, 128, 12, 64), ("base", 32, 384, 12, 64), ("base", 16, 512, 12, 64),
    ("large", 64, 128, 16, 64), ("large", 32, 384, 16, 64), ("large", 16, 512, 16, 64),
    ("minilm", 16, 512, 12, 32), ("d128", 16, 512, 8, 128),
]
KEY_SHAPE = ("base", 16, 512, 12, 64)
# Where the output residual's cost is timed (triton_fa2d / cuda_fa2d): the key shape, and S=128,
# where the forward is closest to memory-bound and the residual's extra write weighs most.
RESIDUAL_COST_SHAPES = (KEY_SHAPE, ("base", 64, 128, 12, 64))
QUICK_SHAPE = ("tiny", 2, 32, 2, 32)


def flops(B: int, S: int, H: int, D: int, mode: str, lengths=None) -> float:
    """lengths: the real length of each of the B rows (None: all S)."""
    squares = B * S * S if lengths is None else sum(int(s) * int(s) for s in lengths)
    fwd = 4.0 * H * D * squares
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


# padded length -> the real length set its padding masks draw from (benchmarks/data/<name>_lengths.txt)
REAL_LENGTHS = {128: "sst2", 384: "squad"}


def length_source(S: int) -> str:
    """"sst2" / "squad" (real lengths, see REAL_LENGTHS) or "unif" (uniform in [S/4, S])."""
    name = REAL_LENGTHS.get(S)
    if name is not None and max(_real_lengths(name)) <= S:
        return name
    return "unif"


def _real_lengths(name: str) -> tuple:
    from .bench_e2e import read_lengths

    return read_lengths(name)


def mask_lengths(B: int, S: int, seed: int) -> list[int]:
    """The real length of each row of a padded case, drawn as length_source(S) says (seeded)."""
    g = torch.Generator().manual_seed(seed)
    source = length_source(S)
    if source == "unif":
        return torch.randint(S // 4, S + 1, (B,), generator=g).tolist()
    pool = _real_lengths(source)
    return [pool[i] for i in torch.randint(0, len(pool), (B,), generator=g).tolist()]


def make_inputs_fn(B, S, H, D, lengths, dtype, device, seed):
    """make_inputs(k) -> (q, k, v, mask): set k, seeded; mask (B, S) bool, True = real token,
    the same in every set (None when lengths is None)."""
    def make_inputs(k):
        g = torch.Generator(device=device).manual_seed(seed + k)
        q, kk, v = (torch.randn(B, S, H, D, dtype=dtype, device=device, generator=g) for _ in range(3))
        mask = None
        if lengths is not None:
            mask = torch.arange(S, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return q, kk, v, mask
    return make_inputs


def _fastbert(backend):
    def fn(q, k, v, mask):
        with use_backend(backend):
            return attention(q, k, v, mask)
    return fn


def _fastbert_fa2_delta(backend):
    """fastbert's kernels without the output residual: the backward takes D_i from the rounded O."""
    from fastbert.ops.attention import AttentionFunction

    def fn(q, k, v, mask):
        return AttentionFunction.apply(q, k, v, mask, None, q.shape[1], 0.0, q.shape[-1] ** -0.5, 0, backend, False)
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


def _impls(device, masked, compile_here, cfg, residual_cost=False):
    """name -> (fn or None, status, note)."""
    from torch.nn.attention import SDPBackend

    impls = harness.kernel_rows(device, _fastbert)
    if residual_cost:
        note = "fastbert kernels without the output residual (FlashAttention-2's D_i)"
        for name, backend in (("triton_fa2d", "triton"), ("cuda_fa2d", "cuda")):
            if harness.backend_unusable(backend, device) is None:
                impls[name] = (_fastbert_fa2_delta(backend), "ok", note)
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
                seed = 1000 * S + 10 * H + D
                lengths = mask_lengths(B, S, seed) if masked else None
                make_inputs = make_inputs_fn(B, S, H, D, lengths, dtype, device, seed)
                label = f"{model} B{B} S{S} H{H} D{D} {'pad-' + length_source(S) if masked else 'nomask'}"
                compile_here = compile_scope == "all" or (compile_scope == "key" and key and dtype == dtypes[0])
                for mode in modes:
                    tier = 1 if key and dtype == dtypes[0] and mode != "bwd" else \
                        2 if dtype == dtypes[0] and mode != "bwd" else 3 if mode != "bwd" else 4
                    residual_cost = shape in RESIDUAL_COST_SHAPES or shape == QUICK_SHAPE
                    for impl, (fn, status, note) in _impls(device, masked, compile_here, cfg, residual_cost).items():
                        out.append(harness.Case(
                            op=OP, impl=impl, label=label,
                            shape={"B": B, "S": S, "H": H, "D": D, "mask": "pad" if masked else "none",
                                   "lengths": length_source(S) if masked else None,
                                   "real_fraction": 1.0 if lengths is None else sum(lengths) / (B * S)},
                            dtype=dtype, mode=mode, fn=fn, make_inputs=make_inputs,
                            work=flops(B, S, H, D, mode, lengths), unit=harness.TFLOPS, grad_idx=(0, 1, 2),
                            tier=tier, status=status, note=note))
    return out


# ----------------------------------------------------------------------------- pytest-benchmark entry

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "pad"])
@pytest.mark.parametrize("impl", ["triton", "cuda", "eager", "compile", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
                                  "sdpa_math"])
def test_attention(benchmark, impl, masked, mode):
    found = [c for c in cases("budget", harness.Settings.make(torch.device("cuda")), compile_scope="key")
             if c.impl == impl and c.mode == mode and c.dtype == torch.bfloat16
             and c.shape["mask"] == ("pad" if masked else "none") and c.tier == 1]
    if not found:
        pytest.skip(f"{impl} is not available here")
    harness.pytest_benchmark(benchmark, found[0])

"""The "cuda" backend's launchers: csrc/ kernels in fastbert._C, called with raw pointers.

fastbert._C takes device pointers, sizes, 64-bit row strides and the CUDA stream as
Python integers (no torch C++ types, so one build serves torch 2.11 to 2.13). It can
check nothing about a tensor, so this module is the safety net: every tensor is checked
here (CUDA device, one device for all, dtype, shape, a contiguous layout) before its
pointer leaves Python. The launchers have the signatures of the Triton launchers in
kernels/ (same outputs, same shapes and dtypes), so the autograd Functions of
fastbert/ops/<op>.py run either backend unchanged:

    add_layernorm_fwd(x, residual, weight, bias, eps, dropout_p=0.0, seed=None, copy=False)
        -> (y, y_copy, mean, rstd)
    add_layernorm_bwd(dy, x, residual, weight, mean, rstd, dropout_p=0.0, seed=None, dy_copy=None)
        -> (dx, dresidual, dweight, dbias)       (dx has 0 elements without dropout)
    layernorm_gelu_fwd(x, weight, bias, eps) -> (y, mean, rstd)
    layernorm_gelu_bwd(dy, x, weight, bias, mean, rstd) -> (dx, dweight, dbias)
    add_layernorm_keep_mask(shape, dropout_p, seed) -> int8 kept-mask (tests)
    bias_gelu_fwd(x, bias, approximate="none") -> y
    bias_gelu_bwd(dy, x, bias, approximate="none") -> (dx, dbias)
    span_score_fwd(start_logits, end_logits, mask, max_answer_len, topk, out=None)
        -> (start_index, end_index, score)

Every output is allocated by `_empty` (tests poison it). The kernels run on the
tensors' device, on torch's current stream of that device.
"""
from __future__ import annotations

import contextlib
import functools
import math
import struct

import torch

from . import _backend

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/fastbert.h DType
LAYERNORM_MAX_HIDDEN = 4096
SPAN_MAX_TOPK = 32
# Blocks of the backward kernels that reduce across rows (dweight/dbias, dbias): at most
# this many per SM, each writing one fp32 row of partial sums (C++ also caps them at what
# is resident at once). Few enough that the partial sums stay a few percent of the traffic.
_LAYERNORM_PARTIALS_PER_SM = 4
_BIAS_GELU_PARTIALS_PER_SM = 8


# ----------------------------------------------------------------------------- shared helpers

def ext():
    """fastbert._C, or a RuntimeError saying why the 'cuda' backend cannot run."""
    module = _backend.cuda_extension()
    if module is None:
        raise RuntimeError("fastbert: the 'cuda' backend needs the compiled extension fastbert._C, which is not "
                           "built here (pip install -e . with nvcc on PATH builds it; FASTBERT_CUDA=1 makes a "
                           "failed build an error)")
    return module


def _empty(shape, dtype, device):
    """Every launcher output is allocated here, so tests can poison them (fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dtype_code(op, name, t, allowed=DTYPES):
    """fastbert._C's code of t's dtype, or a TypeError naming the argument."""
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: the cuda backend takes {names} {name}, got {t.dtype}")
    return allowed[t.dtype]


def check_cuda_tensors(op, **tensors):
    """Every tensor given (None skipped) is a CUDA tensor on the first one's device."""
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"{op}: the cuda backend needs CUDA tensors, {name} is on {t.device}")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}")
    return device


def check_shape(op, name, t, shape, dtype=None):
    """t has exactly `shape` (and `dtype`) and a contiguous layout."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def stream(device):
    """The handle of torch's current stream on `device`, as fastbert._C takes it."""
    return torch.cuda.current_stream(device).cuda_stream


@contextlib.contextmanager
def on_device(device):
    """Make `device` the current CUDA device while launching (kernels launch on the current one)."""
    if device.index is None or device.index == torch.cuda.current_device():
        yield
    else:
        with torch.cuda.device(device):
            yield


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device):
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def ptr(t):
    """Device address of a tensor, 0 for None (a null pointer fastbert._C never reads)."""
    return 0 if t is None else t.data_ptr()


def _seed_tensor(op, seed, device):
    """The (1,) int64 seed on `device`; an int is accepted too (copied to the device)."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return torch.tensor([seed], dtype=torch.int64, device=device)
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"{op}: seed must be an int or a (1,) int64 tensor, got {seed!r}")
    if seed.device != device:
        raise ValueError(f"{op}: seed is on {seed.device} but x is on {device}")
    return seed.reshape(1)


def _rows(op, x, max_cols=None):
    """x viewed as (M, N) rows, contiguous; checks the dtype and width the kernels take."""
    dtype_code(op, "x", x)
    n = x.shape[-1]
    if max_cols is not None and not 1 <= n <= max_cols:
        raise ValueError(f"{op}: the cuda backend takes hidden sizes 1..{max_cols} (x's last dimension), got {n}")
    x = x.contiguous()
    # reshape, not view(-1, n): no -1 can be inferred from 0 elements when n == 0
    return x, x.reshape(math.prod(x.shape[:-1]), n)


def _params(op, x, *params):
    """weight/bias: (N,) in x's dtype or float32, contiguous; returns them and their dtype code."""
    n = x.shape[-1]
    out = []
    for name, t in params:
        if tuple(t.shape) != (n,):
            raise ValueError(f"{op}: {name} must be ({n},) to match x's last dimension, got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype} or float32, got {t.dtype}")
        out.append(t.contiguous())
    if len({t.dtype for t in out}) > 1:
        raise TypeError(f"{op}: " + " and ".join(name for name, _ in params) + " must share a dtype")
    return out, DTYPES[out[0].dtype]


def _stats(op, name, t, m):
    if t.dtype != torch.float32 or t.numel() != m:
        raise ValueError(f"{op}: {name} must be float32 with {m} elements (one per row), "
                         f"got {t.dtype} with {t.numel()}")
    return t.contiguous()


# ----------------------------------------------------------------------------- add_layernorm

def _check_residual(op, name, t, x, like=None):
    """t (residual, or dy like the residual) has x's shape and x's dtype, or float32 with
    float16/bfloat16 x (autocast's mix); `like`: t must have that tensor's dtype instead."""
    dtype_ok = t.dtype == like.dtype if like is not None else (
        t.dtype == x.dtype or (t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)))
    if t.shape != x.shape or not dtype_ok:
        want = like.dtype if like is not None else (
            f"{x.dtype} or float32" if x.dtype != torch.float32 else x.dtype)
        raise ValueError(f"{op}: {name} must be {tuple(x.shape)} {want}, got {tuple(t.shape)} {t.dtype}")


def _float32(value: float) -> float:
    """value as the extension receives it (a C float)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def add_layernorm_fwd(x, residual, weight, bias, eps, dropout_p=0.0, seed=None, copy=False):
    """y = LayerNorm(dropout(x) + residual) over the last dimension (csrc/layernorm.cuh).

    x, residual: (..., N) fp32/fp16/bf16, the same dtype or (autocast's mix) fp16/bf16 x
    with an fp32 residual, N <= 4096 (made contiguous); weight, bias: (N,) x's dtype or
    fp32; seed: (1,) int64 on x's device, needed when dropout_p > 0. Returns (y, y_copy,
    mean, rstd): y with x's shape and the residual's dtype; y_copy, with `copy`, y in x's
    dtype (else an empty (0,) tensor); mean and rstd (M,) fp32 where M = x.numel() // N.
    """
    op = "add_layernorm"
    device = check_cuda_tensors(op, x=x, residual=residual, weight=weight, bias=bias,
                                seed=seed if isinstance(seed, torch.Tensor) else None)
    _check_residual(op, "residual", residual, x)
    x, x2 = _rows(op, x, LAYERNORM_MAX_HIDDEN)
    residual = residual.contiguous()
    (weight, bias), param_code = _params(op, x, ("weight", weight), ("bias", bias))
    m, n = x2.shape
    has_dropout = _float32(dropout_p) > 0.0  # as the extension sees p (ops check it, but not in a trace)
    if has_dropout:
        if seed is None:
            raise ValueError(f"{op}: dropout_p > 0 needs a seed")
        seed = _seed_tensor(op, seed, device)
    y = _empty(x.shape, residual.dtype, x.device)
    y_copy = _empty(x.shape if copy else (0,), x.dtype, x.device)
    mean = _empty((m,), torch.float32, x.device)
    rstd = _empty((m,), torch.float32, x.device)
    if m == 0:
        return y, y_copy, mean, rstd
    with on_device(device):
        ext().add_layernorm_fwd(
            ptr(x), ptr(residual), ptr(weight), ptr(bias), ptr(seed) if has_dropout else 0,
            ptr(y), ptr(mean), ptr(rstd), m, n, n, n, n, float(eps), float(dropout_p),
            DTYPES[x.dtype], param_code, stream(device), DTYPES[residual.dtype],
            ptr(y_copy) if copy else 0, n)
    return y, y_copy, mean, rstd


def add_layernorm_bwd(dy, x, residual, weight, mean, rstd, dropout_p=0.0, seed=None, dy_copy=None):
    """Gradients of add_layernorm from the saved mean/rstd (and seed).

    dy, x, residual: (..., N), the forward's x and residual, dy in the residual's dtype;
    dy_copy: None, or the gradient of the forward's y copy (x's dtype), added to dy;
    weight: (N,); mean, rstd: (M,) fp32. Returns (dx, dresidual, dweight, dbias): dx in x's
    dtype, dresidual in the residual's. Without dropout and with one dtype dx equals
    dresidual and is not written twice: dx is then an empty tensor (0 elements), as in the
    Triton launcher. dweight/dbias come in weight's dtype (summed in fp32).
    """
    op = "add_layernorm backward"
    device = check_cuda_tensors(op, dy=dy, x=x, residual=residual, weight=weight, mean=mean, rstd=rstd,
                                seed=seed if isinstance(seed, torch.Tensor) else None, dy_copy=dy_copy)
    _check_residual(op, "residual", residual, x)
    _check_residual(op, "dy", dy, x, like=residual)
    if dy_copy is not None:
        _check_residual(op, "dy_copy", dy_copy, x, like=x)
        dy_copy = dy_copy.contiguous()
    x, x2 = _rows(op, x, LAYERNORM_MAX_HIDDEN)
    dy, residual = dy.contiguous(), residual.contiguous()
    (weight,), param_code = _params(op, x, ("weight", weight))
    m, n = x2.shape
    mean, rstd = _stats(op, "mean", mean, m), _stats(op, "rstd", rstd, m)
    has_dropout = _float32(dropout_p) > 0.0  # as the extension sees p (ops check it, but not in a trace)
    if has_dropout:
        if seed is None:
            raise ValueError(f"{op}: dropout_p > 0 needs the forward's seed")
        seed = _seed_tensor(op, seed, device)
    write_dx = has_dropout or x.dtype != residual.dtype
    dh = _empty(x.shape, residual.dtype, x.device)
    dx = _empty(x.shape if write_dx else (0,), x.dtype, x.device)
    dweight = _empty(weight.shape, weight.dtype, x.device)
    dbias = _empty(weight.shape, weight.dtype, x.device)
    partials = max(1, _LAYERNORM_PARTIALS_PER_SM * sm_count(device))
    partial = _empty((2, partials, n), torch.float32, x.device) if m > 0 else None
    with on_device(device):
        ext().add_layernorm_bwd(
            ptr(dy), ptr(x), ptr(residual), ptr(weight), ptr(mean), ptr(rstd),
            ptr(seed) if has_dropout else 0, ptr(dh), ptr(dx) if write_dx else 0, ptr(partial),
            ptr(dweight), ptr(dbias), m, n, n, n, n, n, n, partials, float(dropout_p),
            DTYPES[x.dtype], param_code, stream(device), DTYPES[residual.dtype], ptr(dy_copy), n)
    return dx, dh, dweight, dbias


def add_layernorm_keep_mask(shape, dropout_p, seed):
    """The kept-mask add_layernorm uses with this seed and p (the same Philox offsets).

    shape: x's shape (..., N); seed: (1,) int64 on the CUDA device to run on. Returns int8
    of `shape`: 1 where x was kept, 0 where it was dropped.
    """
    op = "add_layernorm_keep_mask"
    device = check_cuda_tensors(op, seed=seed)
    seed = _seed_tensor(op, seed, device)
    n = shape[-1]
    m = math.prod(shape[:-1])
    keep = _empty((m, n), torch.int8, device)
    if m > 0:
        with on_device(device):
            ext().add_layernorm_keep_mask(ptr(seed), ptr(keep), m, n, float(dropout_p), stream(device))
    return keep.view(shape)


# ----------------------------------------------------------------------------- layernorm_gelu

def layernorm_gelu_fwd(x, weight, bias, eps):
    """y = GELU(LayerNorm(x)) over the last dimension (erf GELU).

    x: (..., N) fp32/fp16/bf16, N <= 4096 (made contiguous); weight, bias: (N,) x's dtype
    or fp32. Returns (y, mean, rstd): y with x's shape and dtype, mean and rstd (M,) fp32.
    """
    op = "layernorm_gelu"
    device = check_cuda_tensors(op, x=x, weight=weight, bias=bias)
    x, x2 = _rows(op, x, LAYERNORM_MAX_HIDDEN)
    (weight, bias), param_code = _params(op, x, ("weight", weight), ("bias", bias))
    m, n = x2.shape
    y = _empty(x.shape, x.dtype, x.device)
    mean = _empty((m,), torch.float32, x.device)
    rstd = _empty((m,), torch.float32, x.device)
    if m == 0:
        return y, mean, rstd
    with on_device(device):
        ext().layernorm_gelu_fwd(
            ptr(x), ptr(weight), ptr(bias), ptr(y), ptr(mean), ptr(rstd), m, n, n, n, float(eps),
            DTYPES[x.dtype], param_code, stream(device))
    return y, mean, rstd


def layernorm_gelu_bwd(dy, x, weight, bias, mean, rstd):
    """Gradients of layernorm_gelu from the saved mean/rstd.

    dy, x: (..., N) same shape and dtype; weight, bias: (N,); mean, rstd: (M,) fp32.
    Returns (dx, dweight, dbias): dx with x's shape and dtype, dweight/dbias in weight's dtype.
    """
    op = "layernorm_gelu backward"
    device = check_cuda_tensors(op, dy=dy, x=x, weight=weight, bias=bias, mean=mean, rstd=rstd)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"{op}: dy must be {tuple(x.shape)} {x.dtype}, got {tuple(dy.shape)} {dy.dtype}")
    x, x2 = _rows(op, x, LAYERNORM_MAX_HIDDEN)
    dy = dy.contiguous()
    (weight, bias), param_code = _params(op, x, ("weight", weight), ("bias", bias))
    m, n = x2.shape
    mean, rstd = _stats(op, "mean", mean, m), _stats(op, "rstd", rstd, m)
    dx = _empty(x.shape, x.dtype, x.device)
    dweight = _empty(weight.shape, weight.dtype, x.device)
    dbias = _empty(weight.shape, weight.dtype, x.device)
    partials = max(1, _LAYERNORM_PARTIALS_PER_SM * sm_count(device))
    partial = _empty((2, partials, n), torch.float32, x.device) if m > 0 else None
    with on_device(device):
        ext().layernorm_gelu_bwd(
            ptr(dy), ptr(x), ptr(weight), ptr(bias), ptr(mean), ptr(rstd), ptr(dx), ptr(partial),
            ptr(dweight), ptr(dbias), m, n, n, n, n, partials, DTYPES[x.dtype], param_code, stream(device))
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- bias_gelu

def bias_gelu_fwd(x, bias, approximate="none"):
    """y = GELU(x + bias) (csrc/gelu.cuh).

    x: (..., N) fp32/fp16/bf16 (made contiguous), any N; bias: (N,) x's dtype or fp32;
    approximate "none" (erf) or "tanh". Returns y with x's shape and dtype.
    """
    op = "bias_gelu"
    device = check_cuda_tensors(op, x=x, bias=bias)
    x, x2 = _rows(op, x)
    (bias,), bias_code = _params(op, x, ("bias", bias))
    m, n = x2.shape
    y = _empty(x.shape, x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    with on_device(device):
        ext().bias_gelu_fwd(ptr(x), ptr(bias), ptr(y), m, n, n, n, approximate, DTYPES[x.dtype], bias_code,
                            stream(device))
    return y


def bias_gelu_bwd(dy, x, bias, approximate="none"):
    """Gradients of y = GELU(x + bias): (dx with x's shape and dtype, dbias (N,) in bias's dtype)."""
    op = "bias_gelu backward"
    device = check_cuda_tensors(op, dy=dy, x=x, bias=bias)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"{op}: dy must be {tuple(x.shape)} {x.dtype}, got {tuple(dy.shape)} {dy.dtype}")
    x, x2 = _rows(op, x)
    dy = dy.contiguous()
    (bias,), bias_code = _params(op, x, ("bias", bias))
    m, n = x2.shape
    dx = _empty(x.shape, x.dtype, x.device)
    dbias = _empty(bias.shape, bias.dtype, x.device)
    if n == 0:
        return dx, dbias
    partials = max(1, _BIAS_GELU_PARTIALS_PER_SM * sm_count(device))
    partial = _empty((partials, n), torch.float32, x.device) if m > 0 else None
    with on_device(device):
        ext().bias_gelu_bwd(ptr(dy), ptr(x), ptr(bias), ptr(dx), ptr(partial), ptr(dbias), m, n, n, n, n,
                            partials, approximate, DTYPES[x.dtype], bias_code, stream(device))
    return dx, dbias


# ----------------------------------------------------------------------------- span_score

def span_score_fwd(start_logits, end_logits, mask, max_answer_len, topk, out=None):
    """Top-`topk` spans per row (csrc/span.cuh). Inputs are validated by span_score.

    start_logits, end_logits: (B, L) float16/bfloat16/float32, any strides; mask: (B, L)
    bool or None. Returns (start_index (B, topk) int64, end_index (B, topk) int64,
    score (B, topk) float32). `out`: optional preallocated contiguous (start, end, score).
    """
    op = "span_score"
    device = check_cuda_tensors(op, start_logits=start_logits, end_logits=end_logits, mask=mask)
    code = dtype_code(op, "start_logits", start_logits)
    if start_logits.dim() != 2 or end_logits.shape != start_logits.shape or end_logits.dtype != start_logits.dtype:
        raise ValueError(f"{op}: start_logits and end_logits must be (B, L) of one dtype, got "
                         f"{tuple(start_logits.shape)} {start_logits.dtype} and {tuple(end_logits.shape)} "
                         f"{end_logits.dtype}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != start_logits.shape):
        raise ValueError(f"{op}: mask must be bool {tuple(start_logits.shape)}, got {tuple(mask.shape)} {mask.dtype}")
    B, L = start_logits.shape
    D = min(max_answer_len, L)
    if L * D > 2**31 - 1:
        raise ValueError(f"{op}: the cuda backend needs L * min(max_answer_len, L) < 2^31, "
                         f"got L={L}, max_answer_len={max_answer_len}")
    if not 1 <= topk <= SPAN_MAX_TOPK:
        raise ValueError(f"{op}: topk must be between 1 and {SPAN_MAX_TOPK}, got {topk}")
    if out is None:
        out = (_empty((B, topk), torch.int64, device), _empty((B, topk), torch.int64, device),
               _empty((B, topk), torch.float32, device))
    for name, t, dtype in zip(("start_index", "end_index", "score"), out, (torch.int64, torch.int64, torch.float32)):
        check_cuda_tensors(op, start_logits=start_logits, **{name: t})
        check_shape(op, name, t, (B, topk), dtype)
    if B == 0:
        return out
    m_strides = mask.stride() if mask is not None else (0, 0)
    with on_device(device):
        ext().span_score_fwd(
            ptr(start_logits), ptr(end_logits), ptr(mask), ptr(out[0]), ptr(out[1]), ptr(out[2]),
            B, L, D, topk, *start_logits.stride(), *end_logits.stride(), *m_strides, code, stream(device))
    return out

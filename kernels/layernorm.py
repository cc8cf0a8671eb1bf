"""Triton kernels for the LayerNorm family: add_layernorm and layernorm_gelu.

Forward, per row of N features (w, b: (N,)):

    add_layernorm:   h = dropout(x) + r,  dropout(x)_i = x_i * keep_i / (1 - p)
                     mean = sum_i h_i / N,  rstd = 1 / sqrt(sum_i (h_i - mean)^2 / N + eps)
                     xhat = (h - mean) * rstd,  y = xhat * w + b
    layernorm_gelu:  the same LayerNorm of x (no residual, no dropout), then
                     z = xhat * w + b,  y = GELU(z)   (erf form, see kernels/gelu.py)

The mean is taken in two steps (_centre_rows: the centred row's own mean is subtracted
too), so that a row of one value normalises to exactly 0 as it does in torch.
Only mean and rstd (fp32, one each per row) are saved, plus the dropout seed: keep_i is a
Philox uniform >= p, at a counter fixed by (row, col) (see _keep), so the backward
regenerates exactly the forward's mask instead of storing it.

Backward. Let g be the gradient reaching xhat's affine output (add_layernorm: g = dy;
layernorm_gelu: g = dy * GELU'(z), with z recomputed from the saved statistics). Then

    dw = sum_rows g * xhat,   db = sum_rows g
    with gw = g * w:  dh = rstd * (gw - mean_i(gw) - xhat * mean_i(gw * xhat))

(the usual LayerNorm gradient: the two means project out the directions that mean and
rstd depend on). For add_layernorm, dresidual = dh and dx = dh * keep / (1 - p); without
dropout dx == dresidual, so only dh is written and it serves as both.

Mixed precision (add_layernorm): under autocast x is a Linear's fp16/bf16 output while the
residual stream is fp32. The kernels take that mix as it is: x is read in its own dtype,
y, dh (= dresidual) take the residual's, dx is written separately in x's dtype. That
saves the two passes a promotion would cost (x to fp32 before, dx back after) and gives
bitwise the same numbers, since the math is fp32 either way. With `copy`, the forward also
writes y in x's dtype (what the next Linear reads under autocast: its cast pass saved) and
the backward adds that copy's gradient (x's dtype) to dy as it loads them.

dw/db are reductions across rows. The backward runs a fixed number of programs (a few
per SM); each loops over a strided set of row tiles, accumulates dw/db partial rows in
fp32 registers and writes them to row `pid` of (programs, N) fp32 buffers that torch's
.sum(0) finishes: no atomics, so no contention and a deterministic result.

Rows of any N up to 4096 (BLOCK_N = next power of two, masked); a program handles
BLOCK_M rows at once, more than one when N is small. x is viewed as (rows, N) with a
contiguous last dimension; all math is fp32 with one cast on store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gelu import _cdiv, _direct, _empty, _gelu_erf, _gelu_erf_grad, _next_pow2, _programs, on_input_device

MAX_HIDDEN = 4096  # one row lives in registers; wider rows would spill


# ----------------------------------------------------------------------------- launch settings

def _row_tile(n_rows, n_cols, device, budget):
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, BLOCK_M of them per tile of ~`budget` elements.

    The forward takes ~1024 elements (one row per program for BERT widths, 4 warps up to
    1024 columns, 8 beyond); the backward, whose programs loop over many rows, takes ~4096
    so each iteration has several rows of loads in flight. The interpreter pays per
    program, not per element: it takes 8192 and trims BLOCK_M to the row count (on the
    GPU the tile must not depend on the row count, a symbol under torch.compile).
    """
    block_n = _next_pow2(n_cols)
    if device.type != "cuda":
        budget = 8192
    block_m = min(max(1, budget // block_n), 64)
    if device.type != "cuda":
        block_m = min(block_m, _next_pow2(max(n_rows, 1)))
    tile = block_m * block_n
    return block_m, block_n, 4 if tile <= 1024 else 8


_FWD_TILE = 1024
_BWD_TILE = 4096


@triton.jit
def _keep(
    seed,                   # Philox seed (scalar)
    rows64,                 # (BLOCK_M,) int64 row indices
    N,                      # features
    dropout_p,              # drop probability
    BLOCK_M: tl.constexpr,  # rows in the tile
    BLOCK_N: tl.constexpr,  # columns in the tile (the whole row, from column 0)
    PACKED: tl.constexpr,   # True: one Philox call per 4 columns; False: per column (same result)
):
    """Dropout's (BLOCK_M, BLOCK_N) kept-mask, shared by the forward, backward and debug kernels.

    Element (row, col) uses component col % 4 of Philox(seed, row * ceil(N / 4) + col // 4):
    each Philox call (10 rounds of 32-bit multiplies, the costly part) serves 4 elements.
    PACKED computes the (BLOCK_M, BLOCK_N / 4) calls and interleaves the 4 components with
    join + reshape; the unpacked path computes the same numbers per element (tests compare).
    """
    groups = (N + 3) // 4
    if PACKED:
        q = tl.arange(0, BLOCK_N // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, rows64[:, None] * groups + q[None, :])
        # join appends a minor axis: join(join(r0, r2), join(r1, r3))[m, q, k, j] is
        # component 2k + j of group q, which row-major reshaping puts at column 4q + 2k + j.
        r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    else:
        cols = tl.arange(0, BLOCK_N)
        r0, r1, r2, r3 = tl.randint4x(seed, rows64[:, None] * groups + (cols // 4)[None, :])
        lane = (cols % 4)[None, :]
        r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _centre_rows(
    h,                      # (BLOCK_M, BLOCK_N) fp32 rows, 0 where masked
    mask,                   # (BLOCK_M, BLOCK_N) the real elements
    N,                      # features
):
    """(mean, h - mean, variance) of each row, the row centred twice.

    The float32 sum / N is a rounding or more off the true mean, even for a row of one
    value, and LayerNorm multiplies what is left of it by rstd: 1e6 at BERT's eps 1e-12
    on such a row, where torch's LayerNorm is exact. The once-centred values c are small
    and mostly exact (h close to the mean), so their own mean is that rounding error, got
    almost exactly; c - residue leaves a constant row all zeros, and the variance is the
    corrected two-pass one, sum c^2 / N - residue^2 (csrc/layernorm.cuh sums c and c^2 in
    one reduction). The backward recomputes h - mean from the saved (corrected) mean,
    zero again for such rows.
    """
    mean = tl.sum(h, axis=1) / N
    centered = tl.where(mask, h - mean[:, None], 0.0)
    residue = tl.sum(centered, axis=1) / N
    var = tl.sum(centered * centered, axis=1) / N - residue * residue
    # below 0 by rounding only; a NaN (inf - inf: squares past float32's range) stays NaN, as in
    # torch's LayerNorm, where tl.maximum would make it 0 and rstd 1e6 (a huge finite output)
    var = tl.where(var < 0.0, 0.0, var)
    return mean + residue, tl.where(mask, centered - residue[:, None], 0.0), var


# ----------------------------------------------------------------------------- add_layernorm forward

@triton.jit
def _add_layernorm_fwd_kernel(
    X,                      # (M, N) input that dropout applies to
    R,                      # (M, N) residual: x's dtype, or fp32 with fp16/bf16 x
    W,                      # (N,) LayerNorm weight
    B,                      # (N,) LayerNorm bias
    Y,                      # (M, N) out: LayerNorm(dropout(x) + r), the residual's dtype
    YCopy,                  # (M, N) out: y in x's dtype (written only when HAS_COPY)
    Mean,                   # (M,) fp32 out: row means of h
    Rstd,                   # (M,) fp32 out: 1 / sqrt(var + eps) of h
    Seed,                   # (1,) int64 Philox seed (read only when HAS_DROPOUT)
    stride_xm,              # row stride of X (elements)
    stride_rm,              # row stride of R
    stride_ym,              # row stride of Y
    stride_cm,              # row stride of YCopy
    M,                      # rows
    N,                      # features
    eps,                    # LayerNorm epsilon
    dropout_p,              # drop probability
    dropout_scale,          # 1 / (1 - dropout_p)
    HAS_DROPOUT: tl.constexpr,  # dropout_p > 0
    HAS_COPY: tl.constexpr,     # write YCopy
    BLOCK_M: tl.constexpr,      # rows per program
    BLOCK_N: tl.constexpr,      # next power of two >= N
):
    # Program pid owns rows [pid*BLOCK_M, pid*BLOCK_M + BLOCK_M), each whole.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # rows * stride can pass 2^31 for large activations
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _keep(tl.load(Seed), rows64, N, dropout_p, BLOCK_M, BLOCK_N, BLOCK_N >= 16)
        x = tl.where(keep, x * dropout_scale, 0.0)
    h = x + r
    mean, centered, var = _centre_rows(h, mask, N)
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if HAS_COPY:
        tl.store(YCopy + rows64[:, None] * stride_cm + cols[None, :], y.to(YCopy.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@on_input_device
def add_layernorm_fwd(x, residual, weight, bias, eps, dropout_p=0.0, seed=None, copy=False, *, wrap=_direct):
    """y = LayerNorm(dropout(x) + residual) over the last dimension.

    x, residual: (..., N), fp32/fp16/bf16, the same dtype or (autocast's mix) fp16/bf16 x
    with an fp32 residual; last dimension contiguous (made contiguous otherwise), N <= 4096;
    weight, bias: (N,) x's dtype or fp32; seed: (1,) int64 tensor on x's device, required
    when dropout_p > 0. Returns (y, y_copy, mean, rstd): y with x's shape and the residual's
    dtype; y_copy, with `copy`, y in x's dtype (else an empty (0,) tensor); mean and rstd
    (M,) fp32 where M = x.numel() // N. `wrap` is torch.library.wrap_triton inside the
    custom op.
    """
    x, residual = x.contiguous(), residual.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernel reads them at stride 1
    n = x.shape[-1]
    x2, r2 = x.view(-1, n), residual.view(-1, n)        # (M, N)
    m = x2.shape[0]
    y = _empty(x.shape, residual.dtype, x.device)
    y_copy = _empty(x.shape if copy else (0,), x.dtype, x.device)
    mean = _empty((m,), torch.float32, x.device)
    rstd = _empty((m,), torch.float32, x.device)
    if m == 0:
        return y, y_copy, mean, rstd
    y2 = y.view(-1, n)                                   # (M, N)
    c2 = y_copy.view(-1, n) if copy else y2              # (M, N); never written without copy
    block_m, block_n, num_warps = _row_tile(m, n, x.device, _FWD_TILE)
    has_dropout = dropout_p > 0.0
    wrap(_add_layernorm_fwd_kernel)[(_cdiv(m, block_m),)](
        x2, r2, weight, bias, y2, c2, mean, rstd,
        seed if has_dropout else mean,                   # never read without dropout
        x2.stride(0), r2.stride(0), y2.stride(0), c2.stride(0),
        m, n,
        eps, dropout_p, 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=has_dropout, HAS_COPY=bool(copy),
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, y_copy, mean, rstd


# ----------------------------------------------------------------------------- add_layernorm backward

@triton.jit
def _add_layernorm_bwd_kernel(
    DY,                     # (M, N) upstream gradient, the residual's dtype
    DYCopy,                 # (M, N) gradient of the forward's y copy, x's dtype (read only when HAS_DY_COPY)
    X,                      # (M, N) forward input (h is recomputed)
    R,                      # (M, N) forward residual (x's dtype, or fp32 with fp16/bf16 x)
    W,                      # (N,) LayerNorm weight
    Mean,                   # (M,) fp32 saved row means
    Rstd,                   # (M,) fp32 saved row rstd
    Seed,                   # (1,) int64 Philox seed (read only when HAS_DROPOUT)
    DH,                     # (M, N) out: dL/dh = dresidual (and dx unless WRITE_DX), the residual's dtype
    DX,                     # (M, N) out: dL/dx = dh * keep / (1 - p), x's dtype; written only when WRITE_DX
    DWPartial,              # (programs, N) fp32 out: per-program sums of dy * xhat
    DBPartial,              # (programs, N) fp32 out: per-program sums of dy
    stride_dym,             # row stride of DY
    stride_dcm,             # row stride of DYCopy
    stride_xm,              # row stride of X
    stride_rm,              # row stride of R
    stride_dhm,             # row stride of DH
    stride_dxm,             # row stride of DX
    M,                      # rows
    N,                      # features
    dropout_p,              # drop probability
    dropout_scale,          # 1 / (1 - dropout_p)
    HAS_DROPOUT: tl.constexpr,  # dropout_p > 0
    WRITE_DX: tl.constexpr,     # dx differs from dh (dropout) or has another dtype (mixed)
    HAS_DY_COPY: tl.constexpr,  # add DYCopy to dy
    BLOCK_M: tl.constexpr,      # rows per tile
    BLOCK_N: tl.constexpr,      # next power of two >= N
):
    # Program pid owns row tiles pid, pid + programs, ... and row pid of the partial buffers.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DY_COPY:
            dy += tl.load(DYCopy + rows64[:, None] * stride_dcm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if HAS_DROPOUT:
            keep = _keep(seed, rows64, N, dropout_p, BLOCK_M, BLOCK_N, BLOCK_N >= 16)
            x = tl.where(keep, x * dropout_scale, 0.0)
        xhat = tl.where(mask, (x + r - mean[:, None]) * rstd[:, None], 0.0)
        gw = dy * w[None, :]
        c_xhat = tl.sum(gw * xhat, axis=1) / N
        c_one = tl.sum(gw, axis=1) / N
        dh = (gw - xhat * c_xhat[:, None] - c_one[:, None]) * rstd[:, None]
        tl.store(DH + rows64[:, None] * stride_dhm + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        if WRITE_DX:
            if HAS_DROPOUT:
                dx = tl.where(keep, dh * dropout_scale, 0.0)
            else:
                dx = dh
            tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DWPartial + pid * N + cols, dw, mask=col_mask)
    tl.store(DBPartial + pid * N + cols, db, mask=col_mask)


@on_input_device
def add_layernorm_bwd(dy, x, residual, weight, mean, rstd, dropout_p=0.0, seed=None, dy_copy=None, *,
                      wrap=_direct):
    """Gradients of add_layernorm from the saved mean/rstd (and seed).

    dy, x, residual: (..., N), the forward's x and residual, dy in the residual's dtype;
    dy_copy: None, or the gradient of the forward's y copy (x's dtype), added to dy;
    weight: (N,); mean, rstd: (M,) fp32. Returns (dx, dresidual, dweight, dbias): dx in x's
    dtype, dresidual in the residual's. Without dropout and with one dtype dx equals
    dresidual and is not written twice: dx is then an empty tensor (0 elements) and the
    caller uses dresidual for both. dweight/dbias come in weight's dtype (summed in fp32).
    """
    dy, x, residual = dy.contiguous(), x.contiguous(), residual.contiguous()
    weight = weight.contiguous()  # the kernel reads it at stride 1
    n = x.shape[-1]
    dy2, x2, r2 = dy.view(-1, n), x.view(-1, n), residual.view(-1, n)   # (M, N)
    dc2 = dy_copy.contiguous().view(-1, n) if dy_copy is not None else dy2
    m = x2.shape[0]
    has_dropout = dropout_p > 0.0
    write_dx = has_dropout or x.dtype != residual.dtype
    dh = _empty(x.shape, residual.dtype, x.device)
    dx = _empty(x.shape if write_dx else (0,), x.dtype, x.device)
    if m == 0:
        return dx, dh, torch.zeros_like(weight), torch.zeros_like(weight)
    dh2 = dh.view(-1, n)                                 # (M, N)
    dx2 = dx.view(-1, n) if write_dx else dh2            # (M, N); never written unless write_dx
    block_m, block_n, num_warps = _row_tile(m, n, x.device, _BWD_TILE)
    programs = _programs(x.device, _cdiv(m, block_m), 4)
    dw_partial = _empty((programs, n), torch.float32, x.device)
    db_partial = _empty((programs, n), torch.float32, x.device)
    wrap(_add_layernorm_bwd_kernel)[(programs,)](
        dy2, dc2, x2, r2, weight, mean, rstd,
        seed if has_dropout else mean,                   # never read without dropout
        dh2, dx2, dw_partial, db_partial,
        dy2.stride(0), dc2.stride(0), x2.stride(0), r2.stride(0), dh2.stride(0), dx2.stride(0),
        m, n,
        dropout_p, 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=has_dropout, WRITE_DX=write_dx, HAS_DY_COPY=dy_copy is not None,
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dx, dh, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- dropout mask (tests)

@triton.jit
def _add_layernorm_keep_kernel(
    Keep,                   # (M, N) int8 out: 1 where add_layernorm kept x
    Seed,                   # (1,) int64 Philox seed
    M,                      # rows
    N,                      # features
    dropout_p,              # drop probability
    PACKED: tl.constexpr,   # which of _keep's two (equal) paths to take
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    # Program pid owns rows [pid*BLOCK_M, +BLOCK_M): the same mask as the fwd/bwd kernels.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    keep = _keep(tl.load(Seed), rows64, N, dropout_p, BLOCK_M, BLOCK_N, PACKED)
    tl.store(Keep + rows64[:, None] * N + cols[None, :], keep.to(tl.int8), mask=mask)


@on_input_device
def add_layernorm_keep_mask(shape, dropout_p, seed, packed=None):
    """The kept-mask add_layernorm uses with this seed and p, regenerated at the same offsets.

    shape: x's shape (..., N); seed: (1,) int64 on the device to run on. Returns int8 of
    `shape`: 1 where x was kept, 0 where it was dropped (int8, not bool, so a test can see
    an element the kernel failed to write). packed: force one of _keep's two paths
    (default: the one the kernels take).
    """
    n = shape[-1]
    m = 1
    for size in shape[:-1]:
        m *= size
    keep = _empty((m, n), torch.int8, seed.device)
    if m > 0:
        block_m, block_n, num_warps = _row_tile(m, n, seed.device, _FWD_TILE)
        _add_layernorm_keep_kernel[(_cdiv(m, block_m),)](
            keep, seed, m, n, dropout_p,
            PACKED=block_n >= 16 if packed is None else packed,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return keep.view(shape)


# ----------------------------------------------------------------------------- layernorm_gelu forward

@triton.jit
def _layernorm_gelu_fwd_kernel(
    X,                      # (M, N) input
    W,                      # (N,) LayerNorm weight
    B,                      # (N,) LayerNorm bias
    Y,                      # (M, N) out: GELU(LayerNorm(x)), x's dtype
    Mean,                   # (M,) fp32 out: row means
    Rstd,                   # (M,) fp32 out: 1 / sqrt(var + eps)
    stride_xm,              # row stride of X (elements)
    stride_ym,              # row stride of Y
    M,                      # rows
    N,                      # features
    eps,                    # LayerNorm epsilon
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    # Program pid owns rows [pid*BLOCK_M, pid*BLOCK_M + BLOCK_M), each whole.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean, centered, var = _centre_rows(x, mask, N)
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = _gelu_erf(centered * rstd[:, None] * w[None, :] + b[None, :])
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@on_input_device
def layernorm_gelu_fwd(x, weight, bias, eps, *, wrap=_direct):
    """y = GELU(LayerNorm(x)) over the last dimension (erf GELU).

    x: (..., N) fp32/fp16/bf16, last dimension contiguous (made contiguous otherwise),
    N <= 4096; weight, bias: (N,) x's dtype or fp32.
    Returns (y, mean, rstd): y with x's shape and dtype, mean and rstd (M,) fp32.
    """
    x = x.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernel reads them at stride 1
    n = x.shape[-1]
    x2 = x.view(-1, n)                                   # (M, N)
    m = x2.shape[0]
    y = _empty(x.shape, x.dtype, x.device)
    mean = _empty((m,), torch.float32, x.device)
    rstd = _empty((m,), torch.float32, x.device)
    if m == 0:
        return y, mean, rstd
    y2 = y.view(-1, n)                                   # (M, N)
    block_m, block_n, num_warps = _row_tile(m, n, x.device, _FWD_TILE)
    wrap(_layernorm_gelu_fwd_kernel)[(_cdiv(m, block_m),)](
        x2, weight, bias, y2, mean, rstd,
        x2.stride(0), y2.stride(0),
        m, n,
        eps,
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, mean, rstd


# ----------------------------------------------------------------------------- layernorm_gelu backward

@triton.jit
def _layernorm_gelu_bwd_kernel(
    DY,                     # (M, N) upstream gradient
    X,                      # (M, N) forward input
    W,                      # (N,) LayerNorm weight
    B,                      # (N,) LayerNorm bias (z = xhat * w + b is recomputed)
    Mean,                   # (M,) fp32 saved row means
    Rstd,                   # (M,) fp32 saved row rstd
    DX,                     # (M, N) out: dL/dx, x's dtype
    DWPartial,              # (programs, N) fp32 out: per-program sums of dz * xhat
    DBPartial,              # (programs, N) fp32 out: per-program sums of dz
    stride_dym,             # row stride of DY
    stride_xm,              # row stride of X
    stride_dxm,             # row stride of DX
    M,                      # rows
    N,                      # features
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    # Program pid owns row tiles pid, pid + programs, ... and row pid of the partial buffers.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dz = dy * _gelu_erf_grad(xhat * w[None, :] + b[None, :])   # dy = 0 where masked
        gw = dz * w[None, :]
        c_xhat = tl.sum(gw * xhat, axis=1) / N
        c_one = tl.sum(gw, axis=1) / N
        dx = (gw - xhat * c_xhat[:, None] - c_one[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dz * xhat, axis=0)
        db += tl.sum(dz, axis=0)
    tl.store(DWPartial + pid * N + cols, dw, mask=col_mask)
    tl.store(DBPartial + pid * N + cols, db, mask=col_mask)


@on_input_device
def layernorm_gelu_bwd(dy, x, weight, bias, mean, rstd, *, wrap=_direct):
    """Gradients of layernorm_gelu from the saved mean/rstd.

    dy, x: (..., N) same shape and dtype; weight, bias: (N,); mean, rstd: (M,) fp32.
    Returns (dx, dweight, dbias): dx with x's shape and dtype, dweight/dbias in weight's dtype.
    """
    dy, x = dy.contiguous(), x.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernel reads them at stride 1
    n = x.shape[-1]
    dy2, x2 = dy.view(-1, n), x.view(-1, n)              # (M, N)
    m = x2.shape[0]
    dx = _empty(x.shape, x.dtype, x.device)
    if m == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    dx2 = dx.view(-1, n)                                 # (M, N)
    block_m, block_n, num_warps = _row_tile(m, n, x.device, _BWD_TILE)
    programs = _programs(x.device, _cdiv(m, block_m), 4)
    dw_partial = _empty((programs, n), torch.float32, x.device)
    db_partial = _empty((programs, n), torch.float32, x.device)
    wrap(_layernorm_gelu_bwd_kernel)[(programs,)](
        dy2, x2, weight, bias, mean, rstd,
        dx2, dw_partial, db_partial,
        dy2.stride(0), x2.stride(0), dx2.stride(0),
        m, n,
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)

"""Triton kernels for bias_gelu: y = GELU(x + bias), the FFN intermediate activation.

Math (u = x + bias, per element; bias broadcast along rows):

    erf form (BERT):   gelu(u)  = u * Phi(u),         Phi(u) = 0.5 * (1 + erf(u / sqrt(2)))
                       gelu'(u) = Phi(u) + u * phi(u), phi(u) = exp(-u^2 / 2) / sqrt(2 * pi)
    tanh form:         t        = tanh(k * (u + c * u^3)),   k = sqrt(2 / pi), c = 0.044715
                       gelu(u)  = 0.5 * u * (1 + t)
                       gelu'(u) = 0.5 * (1 + t) + 0.5 * u * (1 - t^2) * k * (1 + 3 * c * u^2)

Backward, given dy:

    dx[m, n]  = dy[m, n] * gelu'(x[m, n] + bias[n])
    dbias[n]  = sum_m dx[m, n]

The backward recomputes u from the saved input x (the activation is never stored): it
reads dy and x and writes dx, the same traffic as reading a stored activation, and the
forward's output can be freed. dbias is a reduction across rows: each program owns one
column block and a strided set of row tiles, accumulates a partial sum in fp32 registers
and writes it to row `pid_m` of a (programs_m, features) fp32 buffer; torch's .sum(0)
over that small buffer finishes it (no atomics, so no contention and a deterministic result).

Layout: x is viewed as (rows, features) with a contiguous last dimension; all math is
fp32 with one cast on store. tanh is written with exp (libdevice is unavailable in the
interpreter): tanh(a) = sign(a) * (1 - e) / (1 + e), e = exp(-2|a|), which cannot overflow.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- GELU helpers
# Shared with kernels/layernorm.py (layernorm_gelu). All take and return fp32 blocks.

# Constants are written out: a plain global is not readable inside @triton.jit (the
# interpreter does not check this), and a tl.constexpr global on the left of a tensor
# product fails in the interpreter.
#   0.7071067811865476 = 1 / sqrt(2),  0.3989422804014327 = 1 / sqrt(2 pi),
#   0.7978845608028654 = sqrt(2 / pi), 0.044715 = the tanh form's cubic coefficient c,
#   0.134145 = 3c.

@triton.jit
def _gelu_erf(u):
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def _gelu_erf_grad(u):
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
    return cdf + u * pdf


@triton.jit
def _tanh(a):
    e = tl.exp(-2.0 * tl.abs(a))  # in (0, 1]: no overflow for any a
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a >= 0, t, -t)


@triton.jit
def _gelu_tanh(u):
    t = _tanh((u + 0.044715 * u * u * u) * 0.7978845608028654)
    return 0.5 * u * (1.0 + t)


@triton.jit
def _gelu_tanh_grad(u):
    t = _tanh((u + 0.044715 * u * u * u) * 0.7978845608028654)
    return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)


# ----------------------------------------------------------------------------- launch settings

# What triton.jit built the kernels as. It reads TRITON_INTERPRET when a kernel is decorated, at
# import, not at launch: set later, the variable names an interpreter these kernels do not use.
BUILT_FOR_INTERPRETER = type(_gelu_erf).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=None)
def _cuda_present() -> bool:
    return torch.cuda.is_available()  # about 1 us a call, and launches are host-bound at short lengths


def on_input_device(launcher):
    """Run `launcher` with its first tensor argument's GPU as the current device. Triton launches on
    the current device and its current stream, whatever the tensors' device: a model on cuda:1 while
    cuda:0 is current had its kernels run on cuda:0 (an illegal address, or with peer access a
    kernel on another device's stream, out of order with torch's work on cuda:1). Under torch.compile
    this is skipped: inductor's code sets the device itself, but other backends (aot_eager, export)
    launch the traced kernels on the current device, so make the model's device current there
    (torch.cuda.set_device; the Trainer and the CLI do)."""
    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if (device is None or device.type != "cuda" or device.index is None or torch.compiler.is_compiling()
                or not _cuda_present()  # fake CUDA tensors (tests/triton_aot.py): nothing launches
                or device.index == torch.cuda.current_device()):
            return launcher(*args, **kwargs)
        with torch.cuda.device(device.index):
            return launcher(*args, **kwargs)
    return launch


def interpreter_launchable(kernel, t, op):
    """Inside a registered op, what an interpreted (TRITON_INTERPRET=1) kernel launches as, given one
    of the op's input tensors. Interpreted kernels run eagerly only (torch 2.13's wrap_triton leaves
    them unwrapped, 2.11's raises): on real tensors the kernel itself; on Dynamo's fake tensors None,
    no launch (the launcher's outputs have their shapes, so a model traces with fullgraph=True and
    backend="eager" runs it); a graph capture (AOTAutograd) would lose the kernel, so it raises."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if isinstance(t, FunctionalTensor) or get_proxy_mode() is not None:
        raise RuntimeError(f"{op}: interpreted Triton kernels (TRITON_INTERPRET=1) cannot be captured in a "
                           "compiled graph; use torch.compile(backend='eager') on the CPU or run on a GPU")
    return None if isinstance(t, FakeTensor) else kernel


def _direct(kernel):
    """Launch a kernel as is; torch.library.wrap_triton is passed instead inside the custom op."""
    return kernel


def _cdiv(a, b):
    """triton.cdiv without its call overhead (~2 us a call: a launcher makes several per launch)."""
    return (a + b - 1) // b


def _next_pow2(n):
    """triton.next_power_of_2 without its call overhead; symbolic sizes (torch.compile) go to it."""
    if type(n) is int and n >= 1:
        return 1 << (n - 1).bit_length()
    return triton.next_power_of_2(n)


def _empty(shape, dtype, device):
    """Every launcher output is allocated here, so tests can poison them (fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(device, tiles, per_sm):
    """How many programs share `tiles` row tiles in a backward that reduces across rows.

    About `per_sm` per SM on a GPU (enough resident programs to hide latency, few enough
    that the fp32 partial-sum buffer stays a few percent of the traffic); 2 in the
    interpreter, which runs programs one after another (2 still exercises the loop).
    """
    if device.type != "cuda":
        return max(1, min(tiles, 2))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(tiles, int(_sm_count(index) * per_sm)))


def _tile(n_rows, n_cols, device):
    """(BLOCK_M, BLOCK_N, num_warps) for the elementwise tiling.

    4096 elements per program (16 per thread with 8 warps: two 16-byte loads in fp16),
    columns in blocks of up to 256 so the usual widths (768, 1024, 3072, 4096) tile exactly.
    Only the interpreter trims BLOCK_M to the row count (on the GPU the tile must not
    depend on the row count, which torch.compile may treat as a symbol).
    """
    block_n = min(_next_pow2(n_cols), 256)
    block_m = max(1, 4096 // block_n)
    if device.type != "cuda":
        block_m = min(block_m, _next_pow2(max(n_rows, 1)))
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


# ----------------------------------------------------------------------------- forward

@triton.jit
def _bias_gelu_fwd_kernel(
    X,                      # (M, N) input, last dim contiguous
    Bias,                   # (N,) bias, added along rows
    Y,                      # (M, N) output GELU(x + bias), x's dtype
    stride_xm,              # row stride of X (elements)
    stride_ym,              # row stride of Y (elements)
    M,                      # rows
    N,                      # features
    APPROX_TANH: tl.constexpr,  # True: tanh GELU; False: erf GELU
    BLOCK_M: tl.constexpr,      # rows per tile
    BLOCK_N: tl.constexpr,      # columns per tile
):
    # Program (pid_m, pid_n) owns rows [pid_m*BLOCK_M, +BLOCK_M) x columns [pid_n*BLOCK_N, +BLOCK_N).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # rows * stride can pass 2^31 for large activations
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)
    u = x + b[None, :]
    if APPROX_TANH:
        y = _gelu_tanh(u)
    else:
        y = _gelu_erf(u)
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@on_input_device
def bias_gelu_fwd(x, bias, approximate="none", *, wrap=_direct):
    """y = GELU(x + bias).

    x: (..., N) fp32/fp16/bf16 with a contiguous last dimension (made contiguous otherwise);
    bias: (N,) x's dtype or fp32. Returns y with x's shape and dtype.
    `wrap` is torch.library.wrap_triton when called from the registered custom op.
    """
    x = x.contiguous()
    bias = bias.contiguous()  # the kernel reads it at stride 1
    n = x.shape[-1]
    x2 = x.view(-1, n)                                   # (M, N)
    m = x2.shape[0]
    y = _empty(x.shape, x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    y2 = y.view(-1, n)                                   # (M, N)
    block_m, block_n, num_warps = _tile(m, n, x.device)
    grid = (_cdiv(m, block_m), _cdiv(n, block_n))
    wrap(_bias_gelu_fwd_kernel)[grid](
        x2, bias, y2,
        x2.stride(0), y2.stride(0),
        m, n,
        APPROX_TANH=approximate == "tanh",
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bias_gelu_bwd_kernel(
    DY,                     # (M, N) upstream gradient
    X,                      # (M, N) forward input (u = x + bias is recomputed)
    Bias,                   # (N,) bias
    DX,                     # (M, N) out: dy * gelu'(x + bias), x's dtype
    DBiasPartial,           # (programs_m, N) fp32 out: per-program column sums of dx
    stride_dym,             # row stride of DY
    stride_xm,              # row stride of X
    stride_dxm,             # row stride of DX
    M,                      # rows
    N,                      # features
    APPROX_TANH: tl.constexpr,  # True: tanh GELU; False: erf GELU
    BLOCK_M: tl.constexpr,      # rows per tile
    BLOCK_N: tl.constexpr,      # columns per tile
):
    # Program (pid_n, pid_m) owns columns [pid_n*BLOCK_N, +BLOCK_N) of the row tiles
    # pid_m, pid_m + programs_m, pid_m + 2*programs_m, ... and one row of DBiasPartial.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    programs_m = tl.num_programs(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(pid_m, tl.cdiv(M, BLOCK_M), programs_m):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = x + b[None, :]
        if APPROX_TANH:
            dx = dy * _gelu_tanh_grad(u)
        else:
            dx = dy * _gelu_erf_grad(u)
        tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dbias += tl.sum(dx, axis=0)  # masked elements have dy = 0, so dx = 0
    tl.store(DBiasPartial + pid_m * N + cols, dbias, mask=col_mask)


@on_input_device
def bias_gelu_bwd(dy, x, bias, approximate="none", *, wrap=_direct):
    """Gradients of y = GELU(x + bias).

    dy, x: (..., N) same shape and dtype; bias: (N,). Returns (dx, dbias): dx with x's
    shape and dtype, dbias (N,) in bias's dtype (summed in fp32).
    """
    dy = dy.contiguous()
    x = x.contiguous()
    bias = bias.contiguous()  # the kernel reads it at stride 1
    n = x.shape[-1]
    x2, dy2 = x.view(-1, n), dy.view(-1, n)              # (M, N)
    m = x2.shape[0]
    dx = _empty(x.shape, x.dtype, x.device)
    if m == 0 or n == 0:
        return dx, torch.zeros_like(bias)
    dx2 = dx.view(-1, n)                                 # (M, N)
    block_m, block_n, num_warps = _tile(m, n, x.device)
    col_blocks = _cdiv(n, block_n)
    # About 4 programs per SM in all; each loops over its share of the row tiles.
    programs_m = _programs(x.device, _cdiv(m, block_m), 4 / col_blocks)
    partial = _empty((programs_m, n), torch.float32, x.device)
    wrap(_bias_gelu_bwd_kernel)[(col_blocks, programs_m)](
        dy2, x2, bias, dx2, partial,
        dy2.stride(0), x2.stride(0), dx2.stride(0),
        m, n,
        APPROX_TANH=approximate == "tanh",
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dx, partial.sum(0).to(bias.dtype)


"""Bidirectional multi-head attention with a key padding mask, and its packed
(variable-length) form.

    out[b, i, h] = sum_j softmax_j(scale * q[b,i,h] . k[b,j,h] + mask_bias[b,j]) * v[b,j,h]

q, k, v are (batch, seqlen, heads, head_dim); mask is (batch, seqlen) bool with
True for real tokens. Padded *query* rows are computed like any other row (as
transformers does); a row whose keys are all masked returns zeros.

attention_varlen takes packed tokens (total_tokens, heads, head_dim) and
cu_seqlens int32 (batch + 1,), the cumulative sequence offsets: sequence b is
tokens cu_seqlens[b] .. cu_seqlens[b+1] - 1 and attends to itself only.

Backends: "torch" (the reference semantics through SDPA), "triton"
(kernels/attention.py: flash attention, forward and backward, dropout
regenerated from a seed), "cuda" (csrc/attention*.cu through fastbert._C:
float16/bfloat16, head_dim 32/64/128; the same dropout mask as "triton" for
one seed).
"""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cuda
from ._backend import (auto_fallback, available_backends, get_backend, interpreter_on, resolve, triton_importable,
                       triton_kernels)
from ._checks import check_dropout, distinct_for_compile, is_real, plain_gradients, refuse_double_backward

# The Triton kernels; None without usable ones (_backend.triton_problem says why): the "triton"
# backend is off and the rest still imports.
_kernels = triton_kernels("attention")

# Head dims the Triton kernels take (multiples of 16 up to 128).
TRITON_HEAD_DIMS = _kernels.SUPPORTED_HEAD_DIMS if _kernels is not None else ()
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)




def attention_ref(q, k, v, mask=None, dropout_p=0.0, softmax_scale=None, dropout_mask=None):
    """Plain-PyTorch attention, the reference every backend is tested against.

    dropout_mask: optional (batch, heads, seqlen, seqlen) bool of kept
    probabilities; given, it replaces random dropout so kernels can be checked
    against the exact mask they used.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale          # (B, H, S, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:  # all keys masked: softmax gave NaN; the row is defined as zeros
        probs = torch.nan_to_num(probs, nan=0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return torch.einsum("bhij,bjhd->bihd", probs, v)                 # (B, S, H, D)


def attention_varlen_ref(q, k, v, cu_seqlens, dropout_p=0.0, softmax_scale=None, dropout_mask=None):
    """Reference for packed sequences: attention_ref on each sequence in turn.

    q, k, v: (total_tokens, heads, head_dim); cu_seqlens: (batch + 1,) int.
    dropout_mask: optional (batch, heads, max_seqlen, max_seqlen) bool, indexed by
    positions within each sequence (what `attention_dropout_mask` returns).
    """
    bounds = cu_seqlens.tolist()
    outs = []
    for b in range(len(bounds) - 1):
        s, e = bounds[b], bounds[b + 1]
        keep = None if dropout_mask is None else dropout_mask[b:b + 1, :, :e - s, :e - s]
        outs.append(attention_ref(q[None, s:e], k[None, s:e], v[None, s:e], None, dropout_p,
                                  softmax_scale, keep)[0])           # (len_b, H, D)
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


def _attention_torch(q, k, v, mask, dropout_p, softmax_scale):
    """The "torch" backend: SDPA (fast on CPU too) with the reference's semantics."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bias = None
    if mask is not None:
        # A finite bias (not -inf) keeps fully masked rows finite; they are zeroed below.
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~mask, torch.finfo(q.dtype).min)[:, None, None, :]  # (B, 1, 1, S)
    # In q's dtype, as the kernels compute it: autocast would run float32 inputs in half here only,
    # and the backends would return different dtypes and values for one call.
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=bias, dropout_p=dropout_p, scale=scale,
        ).transpose(1, 2)                                            # (B, S, H, D)
    if mask is not None:
        out = out * mask.any(dim=1)[:, None, None, None].to(out.dtype)
    return out


def _attention_varlen_torch(q, k, v, cu_seqlens, dropout_p, softmax_scale):
    """The "torch" backend for packed sequences: SDPA on each sequence."""
    bounds = cu_seqlens.tolist()
    outs = [_attention_torch(q[None, s:e], k[None, s:e], v[None, s:e], None, dropout_p, softmax_scale)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]                # each (len_b, H, D)
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def _check_qkv(q, k, v, ndim, layout, op):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"{op}: q, k, v must be floating-point tensors, got {q.dtype}")
    if q.shape[-1] < 1:
        raise ValueError(f"{op}: head_dim (the last dimension of q, k, v) must be >= 1, got shape {tuple(q.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check(q, k, v, mask):
    _check_qkv(q, k, v, 4, "(batch, seqlen, heads, head_dim)", "attention")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention: mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"attention: mask must be torch.bool (True = real token), got {mask.dtype}")
        if mask.shape != q.shape[:2]:
            raise ValueError(f"attention: mask must be (batch, seqlen) = {tuple(q.shape[:2])}, got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"attention: mask is on {mask.device} but q is on {q.device}")


def _check_scale(softmax_scale, op):
    """softmax_scale: None (1/sqrt(head_dim)) or a finite number > 0 (NaN/inf/0/negative would
    give NaN or meaningless probabilities, and the backends would disagree)."""
    if softmax_scale is None:
        return
    if not is_real(softmax_scale):
        raise TypeError(f"{op}: softmax_scale must be None or a float > 0, got {type(softmax_scale).__name__}")
    if not 0.0 < softmax_scale < math.inf:  # False for NaN too; comparisons also trace under torch.compile
        raise ValueError(f"{op}: softmax_scale must be a finite float > 0 (or None for 1/sqrt(head_dim)), "
                         f"got {softmax_scale}")


def _check_seed(seed, op):
    """seed: None (drawn), an int in [0, 2**31) (the range seeds are drawn from; the kernels' Philox
    keys gave one mask for 2**31 and 2**63 - 1, and 2**64 overflowed in the launcher), or an int64
    tensor of one element (read by the kernels, as under torch.compile)."""
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"{op}: a tensor seed must hold one int64, got {seed.dtype} of shape {tuple(seed.shape)}")
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.SymInt)):
        raise TypeError(f"{op}: seed must be None or an int in [0, 2**31), got {type(seed).__name__}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"{op}: seed must be in [0, 2**31), got {seed}")


def _check_varlen(q, k, v, cu_seqlens, max_seqlen):
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)", "attention_varlen")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"attention_varlen: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"attention_varlen: cu_seqlens must be torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"attention_varlen: cu_seqlens must be (batch + 1,) with batch >= 1, "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"attention_varlen: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(f"attention_varlen: max_seqlen must be an int >= 0, got {max_seqlen!r}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        # Checking the values costs a device sync on a GPU, so only CPU offsets are checked;
        # on a GPU a max_seqlen below the longest sequence leaves rows unwritten.
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or bool((lens < 0).any()):
            raise ValueError(f"attention_varlen: cu_seqlens must rise from 0 to total_tokens = {q.shape[0]}, "
                             f"got {cu_seqlens.tolist()}")
        if int(lens.max()) > max_seqlen:
            raise ValueError(f"attention_varlen: max_seqlen = {max_seqlen} is below the longest sequence "
                             f"({int(lens.max())})")


def _check_triton(q, k, v, op):
    """What the Triton kernels need beyond the common checks."""
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"{op}: the Triton backend takes float16, bfloat16 or float32, got {q.dtype}")
    if q.dtype == torch.bfloat16 and interpreter_on():
        raise TypeError(f"{op}: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); "
                        "use float16/float32 on the CPU or run on a GPU")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"{op}: head_dim = {q.shape[-1]} is not supported by the Triton backend; "
                         f"supported head_dim values: {TRITON_HEAD_DIMS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a contiguous last dimension (stride 1) on the Triton "
                             f"backend, got strides {tuple(t.stride())}")


# ---------------------------------------------------------------------------
# Custom ops (torch.compile traces through these) and the autograd Function
# ---------------------------------------------------------------------------

def _residual_like(q, wanted):
    """The buffer for out's rounding residual (kernels/attention.py: D_i from the fp32 O), or None."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device) if wanted else None


def _eager_launchers(fwd, bwd):
    """The Function's launcher interface over launchers with attention_fwd/_bwd's signatures."""
    def attention_fwd(q, k, v, mask, cu, max_seqlen, dropout_p, scale, seed, residual):
        out_residual = _residual_like(q, residual)
        out, lse = fwd(q, k, v, mask, cu, max_seqlen, dropout_p, scale, seed, out_residual=out_residual)
        return out, lse, out_residual

    def attention_bwd(do, q, k, v, out, lse, mask, cu, max_seqlen, dropout_p, scale, seed, out_residual):
        return bwd(do, q, k, v, out, lse, mask, cu, max_seqlen, dropout_p, scale, seed, out_residual=out_residual)
    return SimpleNamespace(attention_fwd=attention_fwd, attention_bwd=attention_bwd)


def _op_launchers(fwd_op, bwd_op):
    """The same interface over registered ops, which return an empty residual when none was asked for."""
    def attention_fwd(q, k, v, mask, cu, max_seqlen, dropout_p, scale, seed, residual):
        out, lse, out_residual = fwd_op(q, k, v, mask, cu, max_seqlen, dropout_p, scale, seed, residual)
        return out, lse, (out_residual if residual else None)

    def attention_bwd(do, q, k, v, out, lse, mask, cu, max_seqlen, dropout_p, scale, seed, out_residual):
        return bwd_op(do, q, k, v, out, lse, mask, cu, max_seqlen, dropout_p, scale, seed, out_residual)
    return SimpleNamespace(attention_fwd=attention_fwd, attention_bwd=attention_bwd)


_LAUNCHERS = {}
if _kernels is not None:
    # Eager Triton: the Function calls the launchers directly (a custom-op dispatch
    # costs 10-30 us per call, and BERT-base calls attention 24 times a step).
    _LAUNCHERS["triton"] = _eager_launchers(_kernels.attention_fwd, _kernels.attention_bwd)

if _kernels is not None and triton_importable() and hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("fastbert::attention_fwd", mutates_args=())
    def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                          cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float,
                          softmax_scale: float, seed: Optional[Tensor],
                          residual: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(out, lse, out_residual): out like q; lse fp32 (B, H, S), or (H, T) with cu_seqlens;
        out_residual like out when `residual`, else empty."""
        out_residual = _residual_like(q, residual)
        out, lse = _kernels.attention_fwd(q, k, v, mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                          0 if seed is None else seed, out_residual=out_residual,
                                          wrap=torch.library.wrap_triton)
        return out, lse, (out_residual if residual else q.new_empty(0))

    @torch.library.triton_op("fastbert::attention_bwd", mutates_args=())
    def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int,
                          dropout_p: float, softmax_scale: float, seed: Optional[Tensor],
                          out_residual: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) like q, k, v."""
        return _kernels.attention_bwd(do, q, k, v, out, lse, mask, cu_seqlens, max_seqlen, dropout_p,
                                      softmax_scale, 0 if seed is None else seed, out_residual=out_residual,
                                      wrap=torch.library.wrap_triton)

    # Used while compiling: the registered ops behind the Function's launcher interface.
    _LAUNCHERS["triton_op"] = _op_launchers(torch.ops.fastbert.attention_fwd, torch.ops.fastbert.attention_bwd)


class AttentionFunction(torch.autograd.Function):
    """Attention with autograd, shared by every backend.

    `launchers` names an entry of _LAUNCHERS: a namespace with
    attention_fwd(q, k, v, mask, cu_seqlens, max_seqlen, dropout_p, scale, seed, residual)
        -> (out, lse, out_residual or None) and
    attention_bwd(do, q, k, v, out, lse, mask, cu_seqlens, max_seqlen, dropout_p, scale, seed, out_residual)
        -> (dq, dk, dv).
    seed: an int, or an int64 tensor of one element on q's device (under torch.compile, and a seed
    drawn for a GPU: _seed_on_device).
    residual: also keep out's rounding residual, so the backward's D_i = rowsum(dO * O) uses the
    fp32 O (kernels/attention.py's docstring); asked for when a gradient will be taken of a
    float16/bfloat16 attention.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, launchers, residual):
        ops = _LAUNCHERS[launchers]
        out, lse, out_residual = ops.attention_fwd(q, k, v, mask, cu_seqlens, max_seqlen, dropout_p,
                                                   softmax_scale, seed, residual)
        seed_t = seed if isinstance(seed, torch.Tensor) else None
        ctx.save_for_backward(q, k, v, out, lse, mask, cu_seqlens, seed_t, out_residual)
        ctx.seed = None if seed_t is not None else seed
        ctx.args = (max_seqlen, dropout_p, softmax_scale, launchers)
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward(ctx, "attention", dout)
        q, k, v, out, lse, mask, cu_seqlens, seed_t, out_residual = ctx.saved_tensors
        max_seqlen, dropout_p, softmax_scale, launchers = ctx.args
        seed = seed_t if seed_t is not None else ctx.seed
        with plain_gradients("attention"):
            if dout.stride(-1) != 1:
                dout = dout.contiguous()
            dq, dk, dv = _LAUNCHERS[launchers].attention_bwd(dout, q, k, v, out, lse, mask, cu_seqlens,
                                                             max_seqlen, dropout_p, softmax_scale, seed, out_residual)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _wants_residual(q, k):
    """Keep out's rounding residual for the backward: a gradient will be taken through D_i, i.e. of
    q or k (dv = P^T dO needs none), grad mode is on (it is off inside Function.forward, so this is
    decided outside it), and out is rounded (not fp32)."""
    return q.dtype != torch.float32 and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)


def _attention_kernels(q, k, v, mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, eager, compiled):
    """AttentionFunction over the launchers named `eager` (a plain call) or, while torch.compile
    traces, `compiled` (the registered custom ops)."""
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    residual = _wants_residual(q, k)
    compiling = torch.compiler.is_compiling()
    if dropout_p <= 0.0:
        seed = None if compiling else 0                    # never read
    elif compiling or _seed_on_device(q, seed):
        seed = (torch.randint(0, 2**31 - 1, (1,), device=q.device) if seed is None
                else torch.full((1,), int(seed), dtype=torch.int64, device=q.device))
    else:   # torch.manual_seed reproduces a drawn one
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if seed is None else int(seed)
    q, k, v = distinct_for_compile(q, k, v)
    return AttentionFunction.apply(q, k, v, mask, cu_seqlens, max_seqlen, dropout_p, scale, seed,
                                   compiled if compiling else eager, residual)


def _seed_on_device(q, seed):
    """Draw the dropout seed as a tensor on q's GPU, which the kernels read, rather than as a host
    int: a CUDA graph would replay a host int unchanged (one mask for every replay) where the
    device generator advances per replay, and the warm-up runs before a capture then compile the
    very kernels the capture launches. On the CPU (the interpreter, the emulation) a host int; under
    torch.compile always a tensor (an int would need .item(), a graph break)."""
    return seed is None and q.is_cuda


def _attention_triton(*args):
    return _attention_kernels(*args, eager="triton", compiled="triton_op")


# ---------------------------------------------------------------------------
# The "cuda" backend: launchers over fastbert._C (csrc/attention*.cu)
# ---------------------------------------------------------------------------

CUDA_HEAD_DIMS = (32, 64, 128)
_CUDA_DTYPE_CODES = {d: code for d, code in _cuda.DTYPES.items() if d != torch.float32}  # fastbert.h DType


# The CUDA kernels' grid: x = batch * heads (2**31 - 1 at most), y = blocks of 64 rows of one sequence
# (65,535 at most). The Triton kernels put all on one axis and take more.
CUDA_MAX_SEQLEN = 65535 * 64
CUDA_MAX_BATCH_HEADS = 2**31 - 1


def _cuda_batch_heads(q, cu_seqlens=None) -> int:
    return (cu_seqlens.shape[0] - 1) * q.shape[1] if cu_seqlens is not None else q.shape[0] * q.shape[2]


def _check_cuda(q, k, v, op, seqlen=None, batch_heads=None):
    """What the CUDA kernels need beyond the common checks. seqlen / batch_heads (the launch's, from
    the public op): checked against the grid's limits when given."""
    if q.dtype == torch.float32:
        raise NotImplementedError(f"{op}: the 'cuda' backend has float16 and bfloat16 kernels only, got float32 "
                                  "inputs; use the 'triton' or 'torch' backend for float32 "
                                  "(fastbert.ops.use_backend('triton'))")
    if q.dtype not in _CUDA_DTYPE_CODES:
        raise TypeError(f"{op}: the 'cuda' backend takes float16 or bfloat16, got {q.dtype}")
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        raise ValueError(f"{op}: head_dim = {q.shape[-1]} is not supported by the 'cuda' backend; "
                         f"supported head_dim values: {CUDA_HEAD_DIMS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a contiguous last dimension (stride 1) on the 'cuda' "
                             f"backend, got strides {tuple(t.stride())}")
    if seqlen is not None and seqlen > CUDA_MAX_SEQLEN:
        raise ValueError(f"{op}: {'max_seqlen' if op.endswith('varlen') else 'seqlen'} = {seqlen} is more than the "
                         f"'cuda' backend's grid takes ({CUDA_MAX_SEQLEN}); use the 'triton' backend")
    if batch_heads is not None and batch_heads > CUDA_MAX_BATCH_HEADS:
        raise ValueError(f"{op}: batch x heads = {batch_heads} is more than the 'cuda' backend's grid takes "
                         f"(2**31 - 1); split the batch")


def _triton_supports(q, k, v):
    """Can the Triton kernels take these inputs (dtype, head dim, unit last stride)? _check_triton's terms."""
    return (q.dtype in _TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS
            and all(t.shape[-1] <= 1 or t.stride(-1) == 1 for t in (q, k, v))
            and not (q.dtype == torch.bfloat16 and interpreter_on()))


def _kernel_backend(q, k, v, seqlen, batch_heads) -> str:
    """The backend for these inputs: the one asked for by name, or under "auto" the fastest usable one
    whose kernels take them (cuda, then triton, then torch)."""
    backend = resolve(q.device)
    if backend == "cuda" and not _cuda_supports(q, k, v, seqlen, batch_heads):
        backend = _cuda_fallback(get_backend(), q.device)
    if backend == "triton" and not _triton_supports(q, k, v):
        backend = auto_fallback(backend)
    return backend


def _cuda_supports(q, k, v, seqlen=0, batch_heads=0):
    """Can the CUDA kernels take these inputs (dtype, head dim, unit last stride, grid limits)?"""
    return (q.dtype in _CUDA_DTYPE_CODES and q.shape[-1] in CUDA_HEAD_DIMS
            and all(t.shape[-1] <= 1 or t.stride(-1) == 1 for t in (q, k, v))
            and seqlen <= CUDA_MAX_SEQLEN and batch_heads <= CUDA_MAX_BATCH_HEADS)


@torch.compiler.assume_constant_result
def _cuda_fallback(requested: str, device: torch.device) -> str:
    """The backend for inputs the CUDA kernels cannot take: under "auto" the next usable one
    (so float32 or an odd head dim keeps working on a GPU), "cuda" when it was asked for by
    name (its checks then raise the clear error). `requested`: get_backend()'s, read outside this
    constant-folded function, where torch.compile guards it."""
    if requested != "auto":
        return "cuda"
    return "triton" if "triton" in available_backends(device) else "torch"


def _cuda_ext():
    """fastbert._C (tests swap in the CPU emulation of tests/cuda_emu)."""
    return _cuda.ext()


def _cuda_strides(t, varlen):
    """(stride_b, stride_s, stride_h) in elements; size-1 dims get 0 (never stepped)."""
    shape, stride = t.shape, t.stride()
    if varlen:
        return 0, (stride[0] if shape[0] != 1 else 0), (stride[1] if shape[1] != 1 else 0)
    return ((stride[0] if shape[0] != 1 else 0), (stride[1] if shape[1] != 1 else 0),
            (stride[2] if shape[2] != 1 else 0))


def _cuda_layout_ok(t, strides):
    """The kernels' 16-byte rows: unit last stride, aligned start, other strides in multiples of 8."""
    return ((t.stride(-1) == 1 or t.shape[-1] <= 1) and t.data_ptr() % 16 == 0
            and strides[0] % 8 == 0 and strides[1] % 8 == 0 and strides[2] % 8 == 0)


def _check_like(t, name, like):
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"attention (cuda): {name} must be {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _cuda_input(t, varlen, name=None, like=None):
    """(t or a contiguous copy when its rows break the kernels' 16-byte alignment, its operand
    (data_ptr, stride_b, stride_s, stride_h)), t checked against `like` first. One stride read
    on the common, aligned path."""
    if like is not None:
        _check_like(t, name, like)
    strides = _cuda_strides(t, varlen)
    if not _cuda_layout_ok(t, strides):
        t = t.clone(memory_format=torch.contiguous_format)
        strides = _cuda_strides(t, varlen)
    return t, (t.data_ptr(), *strides)


def _cuda_operand(t, varlen, name, like=None):
    """(data_ptr, stride_b, stride_s, stride_h) of a kernel operand, checked."""
    if like is not None:
        _check_like(t, name, like)
    strides = _cuda_strides(t, varlen)
    if not _cuda_layout_ok(t, strides):
        raise ValueError(f"attention (cuda): {name} needs a unit last stride, a 16-byte aligned start and "
                         f"batch/seq/head strides in multiples of 8 elements; got strides {tuple(t.stride())}")
    return (t.data_ptr(), *strides)


def _cuda_stats(t, shape, name, device):
    """(data_ptr, stride_b, stride_h) of lse (or delta): fp32 (B, H, S) or (H, T), token stride 1."""
    if t.shape != shape or t.dtype != torch.float32 or t.device != device or (t.numel() > 1 and t.stride(-1) != 1):
        raise ValueError(f"attention (cuda): {name} must be float32 {tuple(shape)} on {device} with a unit last "
                         f"stride, got {tuple(t.shape)} {t.dtype} on {t.device} strides {tuple(t.stride())}")
    if len(shape) == 2:
        return (t.data_ptr(), 0, t.stride(0))
    return (t.data_ptr(), t.stride(0), t.stride(1))


def _cuda_call_args(q, mask, cu_seqlens, max_seqlen, dropout_p, seed, ext):
    """Sizes, mask, cu_seqlens, seed and stream arguments shared by the forward and backward."""
    emulated = getattr(ext, "HOST_EMULATION", False)
    if q.device.type != "cuda" and not emulated:
        raise ValueError(f"attention (cuda): tensors must be on a CUDA device, got {q.device}")
    varlen = cu_seqlens is not None
    if varlen:
        B, S, (_, H, D) = cu_seqlens.shape[0] - 1, int(max_seqlen), q.shape
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.device != q.device or not cu_seqlens.is_contiguous():
            raise ValueError("attention (cuda): cu_seqlens must be a contiguous int32 tensor on q's device")
        if mask is not None:
            raise ValueError("attention (cuda): packed sequences (cu_seqlens) take no mask")
    else:
        B, S, H, D = q.shape
    mask_arg = (0, 0, 0)
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (B, S) or mask.device != q.device:
            raise ValueError(f"attention (cuda): mask must be bool ({B}, {S}) on {q.device}")
        m8 = mask.view(torch.uint8)                                   # same bytes, (B, S)
        mask_arg = (m8.data_ptr(), m8.stride(0), m8.stride(1))
    seed_val, seed_ptr, thresh = 0, 0, 0
    if dropout_p > 0.0:
        thresh = min(int(round(dropout_p * 2.0**31)), 2**31 - 1)   # as kernels/attention.py
        if isinstance(seed, torch.Tensor):
            if seed.dtype != torch.int64 or seed.device != q.device or seed.numel() < 1:
                raise ValueError("attention (cuda): a tensor seed must be int64 with one element on q's device")
            seed_ptr = seed.data_ptr()
        else:
            seed_val = int(seed)
    stream = 0 if emulated else _cuda.stream(q.device)
    return dict(mask=mask_arg, cu_seqlens=cu_seqlens.data_ptr() if varlen else 0, seed_ptr=seed_ptr,
                batch=B, heads=H, seqlen=S, head_dim=D, dtype=_CUDA_DTYPE_CODES[q.dtype],
                dropout_p=float(dropout_p), dropout_threshold=thresh, seed=seed_val, stream=stream)


def _cuda_device(q):
    """Launch on q's device (the emulation runs on the host)."""
    return _cuda.on_device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()


def _cuda_residual(out_residual, out, out_arg, varlen):
    """The operand of out's rounding residual ((0, 0, 0, 0): none); it shares out's strides."""
    if out_residual is None:
        return (0, 0, 0, 0)
    _check_like(out_residual, "out_residual", out)
    arg = _cuda_operand(out_residual, varlen, "out_residual")
    if arg[1:] != out_arg[1:]:
        raise ValueError(f"attention (cuda): out_residual must have out's strides {tuple(out.stride())}, "
                         f"got {tuple(out_residual.stride())}")
    return arg


def cuda_attention_fwd(q, k, v, mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
                       softmax_scale=None, seed=0, out=None, lse=None, out_residual=None):
    """Forward launcher of the "cuda" backend (kernels/attention.py attention_fwd's signature).

    q, k, v: (B, S, H, D) or packed (T, H, D) float16/bfloat16, unit last stride.
    Returns (out, lse): out contiguous like q, lse fp32 (B, H, S) or (H, T).
    out, lse: optional preallocated outputs (tests poison them).
    out_residual: None, or a tensor like out (same strides) that receives out's rounding residual.
    """
    ext = _cuda_ext()
    if q.dtype not in _CUDA_DTYPE_CODES:
        _check_cuda(q, k, v, "attention")
    varlen = cu_seqlens is not None
    args = _cuda_call_args(q, mask, cu_seqlens, max_seqlen, dropout_p, seed, ext)
    B, S, H = args["batch"], args["seqlen"], args["heads"]
    (k, k_arg), (v, v_arg) = _cuda_input(k, varlen, "k", q), _cuda_input(v, varlen, "v", q)
    q, q_arg = _cuda_input(q, varlen)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse_shape = (H, q.shape[0]) if varlen else (B, H, S)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device) if lse is None else lse
    out_arg = _cuda_operand(out, varlen, "out", q)
    operands = dict(q=q_arg, k=k_arg, v=v_arg, out=out_arg,
                    out_residual=_cuda_residual(out_residual, out, out_arg, varlen),
                    lse=_cuda_stats(lse, lse_shape, "lse", q.device))
    if q.numel():
        with _cuda_device(q):
            ext.attention_fwd(**operands, softmax_scale=float(scale), **args)
    return out, lse


def cuda_attention_bwd(do, q, k, v, out, lse, mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
                       softmax_scale=None, seed=0, dq=None, dk=None, dv=None, out_residual=None):
    """Backward launcher of the "cuda" backend (kernels/attention.py attention_bwd's signature).

    Returns (dq, dk, dv), contiguous, in q's layout. seed must be the forward's seed.
    Deterministic: one kernel writes D = rowsum(do * (out + out_residual)) and dq per
    query block, a second writes dk and dv per key block; no atomics.
    out_residual: the forward's, or None (D from the rounded out).
    """
    ext = _cuda_ext()
    if q.dtype not in _CUDA_DTYPE_CODES:
        _check_cuda(q, k, v, "attention")
    varlen = cu_seqlens is not None
    args = _cuda_call_args(q, mask, cu_seqlens, max_seqlen, dropout_p, seed, ext)
    B, S, H = args["batch"], args["seqlen"], args["heads"]
    if out_residual is not None:
        _check_like(out, "out", q)
        _check_like(out_residual, "out_residual", out)
        if not (_cuda_layout_ok(out, _cuda_strides(out, varlen))
                and _cuda_layout_ok(out_residual, _cuda_strides(out_residual, varlen))):
            # One of the two is copied to align it: both, so that they keep sharing strides
            out, out_residual = (t.clone(memory_format=torch.contiguous_format) for t in (out, out_residual))
    (do, do_arg), (k, k_arg), (v, v_arg), (out, out_arg) = (
        _cuda_input(t, varlen, name, q) for name, t in (("dout", do), ("k", k), ("v", v), ("out", out)))
    q, q_arg = _cuda_input(q, varlen)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    lse_shape = (H, q.shape[0]) if varlen else (B, H, S)
    lse_arg = _cuda_stats(lse, lse_shape, "lse", q.device)
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=q.device)
    operands = dict(dout=do_arg, q=q_arg, k=k_arg, v=v_arg, out=out_arg,
                    out_residual=_cuda_residual(out_residual, out, out_arg, varlen), lse=lse_arg,
                    delta=delta.data_ptr(),
                    dq=_cuda_operand(dq, varlen, "dq", q), dk=_cuda_operand(dk, varlen, "dk", q),
                    dv=_cuda_operand(dv, varlen, "dv", q))
    if q.numel():
        with _cuda_device(q):
            ext.attention_bwd(**operands, softmax_scale=float(scale), **args)
    return dq, dk, dv


def cuda_attention_dropout_mask(batch, heads, seqlen, dropout_p, seed, device):
    """The keep-mask (batch, heads, seqlen, seqlen) bool the CUDA kernels use (debug).

    On a CPU device it is computed on the host by the same C++ Philox code, so
    the stream can be compared with the Triton backend's without a GPU.
    """
    ext = _cuda_ext()
    device = torch.device(device)
    keep = torch.empty((batch, heads, seqlen, seqlen), dtype=torch.uint8, device=device)
    thresh = min(int(round(dropout_p * 2.0**31)), 2**31 - 1)
    if keep.numel():
        if device.type == "cuda":
            with _cuda.on_device(device):
                ext.attention_dropout_mask(keep.data_ptr(), batch, heads, seqlen, int(seed), thresh,
                                           _cuda.stream(device))
        else:
            ext.attention_dropout_mask_host(keep.data_ptr(), batch, heads, seqlen, int(seed), thresh)
    return keep.bool()


_LAUNCHERS["cuda"] = _eager_launchers(cuda_attention_fwd, cuda_attention_bwd)

if hasattr(torch.library, "custom_op"):
    # The CUDA launchers as opaque custom ops, so torch.compile(fullgraph=True) keeps them in
    # the graph; the fake functions give the output shapes. Autograd: the shared AttentionFunction.
    @torch.library.custom_op("fastbert::attention_fwd_cuda", mutates_args=())
    def _attention_fwd_cuda_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                               cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float,
                               softmax_scale: float, seed: Optional[Tensor],
                               residual: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(out, lse, out_residual): out like q (contiguous); lse fp32 (B, H, S), or (H, T) with
        cu_seqlens; out_residual like out when `residual`, else empty."""
        out_residual = _residual_like(q, residual)
        out, lse = cuda_attention_fwd(q, k, v, mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                      0 if seed is None else seed, out_residual=out_residual)
        return out, lse, (out_residual if residual else q.new_empty(0))

    @_attention_fwd_cuda_op.register_fake
    def _(q, k, v, mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, residual):
        if cu_seqlens is not None:
            lse_shape = (q.shape[1], q.shape[0])                     # (H, T)
        else:
            lse_shape = (q.shape[0], q.shape[2], q.shape[1])         # (B, H, S)
        return (q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32),
                q.new_empty(q.shape if residual else (0,)))

    @torch.library.custom_op("fastbert::attention_bwd_cuda", mutates_args=())
    def _attention_bwd_cuda_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int,
                               dropout_p: float, softmax_scale: float, seed: Optional[Tensor],
                               out_residual: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) like q, k, v (contiguous)."""
        return cuda_attention_bwd(do, q, k, v, out, lse, mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                  0 if seed is None else seed, out_residual=out_residual)

    @_attention_bwd_cuda_op.register_fake
    def _(do, q, k, v, out, lse, mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, out_residual):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    _LAUNCHERS["cuda_op"] = _op_launchers(torch.ops.fastbert.attention_fwd_cuda, torch.ops.fastbert.attention_bwd_cuda)


def _attention_cuda(*args):
    return _attention_kernels(*args, eager="cuda", compiled="cuda_op")


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------

def attention(q, k, v, mask=None, dropout_p=0.0, softmax_scale=None, *, seed=None):
    """Multi-head attention. q, k, v: (batch, seqlen, heads, head_dim); mask: (batch, seqlen) bool.

    Returns (batch, seqlen, heads, head_dim) in q's dtype. softmax_scale defaults
    to 1/sqrt(head_dim). seed (triton and cuda backends): the dropout seed; None draws one
    from the default generator of q's device (on a GPU as a device tensor, which CUDA graph replays
    redraw), so torch.manual_seed reproduces a run.
    """
    _check(q, k, v, mask)
    check_dropout("attention", dropout_p, torch.compiler.is_compiling())
    _check_seed(seed, "attention")
    _check_scale(softmax_scale, "attention")
    seqlen, batch_heads = q.shape[1], _cuda_batch_heads(q)
    backend = _kernel_backend(q, k, v, seqlen, batch_heads)
    if backend == "torch":
        return _attention_torch(q, k, v, mask, dropout_p, softmax_scale)
    if backend == "cuda":
        _check_cuda(q, k, v, "attention", seqlen, batch_heads)
        return _attention_cuda(q, k, v, mask, None, q.shape[1], dropout_p, softmax_scale, seed)
    _check_triton(q, k, v, "attention")
    return _attention_triton(q, k, v, mask, None, q.shape[1], dropout_p, softmax_scale, seed)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, *, seed=None):
    """Attention over packed sequences. q, k, v: (total_tokens, heads, head_dim);
    cu_seqlens: int32 (batch + 1,) offsets; max_seqlen: int >= the longest sequence.

    Returns (total_tokens, heads, head_dim) in q's dtype. Same dropout, scale and
    seed rules as `attention`; with one seed, the dropout mask equals the one
    `attention` uses for the same sequences padded to a batch.
    """
    _check_varlen(q, k, v, cu_seqlens, max_seqlen)
    check_dropout("attention_varlen", dropout_p, torch.compiler.is_compiling())
    _check_seed(seed, "attention_varlen")
    _check_scale(softmax_scale, "attention_varlen")
    batch_heads = _cuda_batch_heads(q, cu_seqlens)
    backend = _kernel_backend(q, k, v, max_seqlen, batch_heads)
    if backend == "torch":
        return _attention_varlen_torch(q, k, v, cu_seqlens, dropout_p, softmax_scale)
    if backend == "cuda":
        _check_cuda(q, k, v, "attention_varlen", max_seqlen, batch_heads)
        return _attention_cuda(q, k, v, None, cu_seqlens.contiguous(), max_seqlen, dropout_p, softmax_scale, seed)
    _check_triton(q, k, v, "attention_varlen")
    return _attention_triton(q, k, v, None, cu_seqlens.contiguous(), max_seqlen, dropout_p, softmax_scale, seed)

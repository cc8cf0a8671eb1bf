"""The LayerNorm family BERT runs after every sub-layer.

    add_layernorm(x, residual)  = LayerNorm(dropout(x) + residual)     (post-LN residual)
    layernorm_gelu(x)           = GELU(LayerNorm(x))                   (prediction-head transform)

x, residual: (..., hidden); weight, bias: (hidden,). GELU is the exact erf form.

Backends: "torch" runs the references below; "triton" runs kernels/layernorm.py through
the autograd Functions here (one per op, shared by every backend: each receives its
backend's launchers `<op>_fwd`/`<op>_bwd`). In eager mode the Functions call the Triton
launchers directly; under torch.compile they call the same launchers registered as
custom ops (fastbert::add_layernorm_fwd, ...) with torch.library.triton_op, so the
compiler traces through the kernels with fullgraph=True. "cuda" runs csrc/layernorm*.cu
(fastbert._C) through the same Functions with the launchers of fastbert/ops/_cuda.py;
under torch.compile they are the opaque custom ops fastbert::<op>_{fwd,bwd}_cuda with
fake (meta) functions, so fullgraph=True still holds.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _cuda
from ._backend import auto_fallback, interpreter_on, resolve, triton_kernels, triton_wrap
from ._checks import check_dropout, distinct_for_compile, is_real, plain_gradients, refuse_double_backward

# None without usable Triton kernels (_backend.triton_problem says why): the "triton" backend
# is off, the rest works.
_triton_layernorm = triton_kernels("layernorm")

MAX_HIDDEN = 4096  # the Triton kernels hold a whole row in registers


def _layer_norm(h, weight, bias, eps):
    """F.layer_norm that also takes float32 weight/bias with lower-precision h (mixed
    precision; CUDA's kernel refuses the mix): it then normalises in float32, returns h's dtype."""
    if weight.dtype == h.dtype:
        return F.layer_norm(h, weight.shape, weight, bias, eps)
    return F.layer_norm(h.to(weight.dtype), weight.shape, weight, bias, eps).to(h.dtype)


def _torch_backend(ref, tensors, *args):
    """The torch backend: `ref` on `tensors`, except that float16/bfloat16 CPU tensors are
    normalised in float32, as the kernels do: PyTorch's CPU LayerNorm backward in float16 returns
    NaN for a row of equal values when eps underflows float16 (BERT's 1e-12 does)."""
    x = tensors[0]
    if x.device.type == "cpu" and x.dtype in _HALF_DTYPES:
        return ref(*(t.float() for t in tensors), *args).to(x.dtype)
    return ref(*tensors, *args)


def add_layernorm_ref(x, residual, weight, bias, eps, dropout_p=0.0, dropout_mask=None):
    """Plain-PyTorch reference; dropout_mask (same shape as x, bool kept) replaces random dropout."""
    if dropout_mask is not None:
        x = x * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        x = F.dropout(x, dropout_p)
    return _layer_norm(x + residual, weight, bias, eps)


def layernorm_gelu_ref(x, weight, bias, eps):
    return F.gelu(_layer_norm(x, weight, bias, eps))


def _check_rows(op, x, weight, bias, residual=None, mixed_ok=False):
    tensors = [("x", x), ("weight", weight), ("bias", bias)] + ([("residual", residual)] if residual is not None else [])
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (hidden last), got a scalar")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (hidden,):
            raise ValueError(f"{op}: {name} must be ({hidden},) to match x's last dimension, got {tuple(t.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype and not mixed_ok:
            raise TypeError(f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if weight.dtype != bias.dtype:
        raise TypeError(f"{op}: weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: weight must have x's dtype {x.dtype} or float32 (mixed precision), "
                        f"got {weight.dtype}")


def _check_eps(op, eps):
    """eps: a finite number >= 0 (a negative or NaN eps gives NaN rows; inf gives zeros)."""
    if not is_real(eps):
        raise TypeError(f"{op}: eps must be a float >= 0, got {type(eps).__name__}")
    if not 0.0 <= eps < math.inf:  # False for NaN too; comparisons also trace under torch.compile
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps}")


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _autocast_mixed(x, residual):
    """Did autocast give x and residual different floating dtypes?"""
    return (isinstance(x, torch.Tensor) and isinstance(residual, torch.Tensor) and x.dtype != residual.dtype
            and x.is_floating_point() and residual.is_floating_point()
            and torch.is_autocast_enabled(x.device.type))


def _promote(x, residual):
    common = torch.promote_types(x.dtype, residual.dtype)
    return x.to(common), residual.to(common)


def _check_kernel_rows(op, x):
    """What the Triton kernels support beyond the op's definition."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: the triton backend takes float32, float16 or bfloat16 x, got {x.dtype}")
    if x.dtype == torch.bfloat16 and interpreter_on():
        # The Triton interpreter computes bf16 wrongly without an error.
        raise TypeError(f"{op}: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); "
                        "use float32/float16 or a GPU")
    if not 1 <= x.shape[-1] <= MAX_HIDDEN:
        raise ValueError(f"{op}: the triton backend takes hidden sizes 1..{MAX_HIDDEN} "
                         f"(x's last dimension), got {x.shape[-1]}")


def _rows_backend(x) -> str:
    """resolve(), with "auto" taking "torch" for rows no kernel takes (both backends' terms are the same)."""
    backend = resolve(x.device)
    if backend != "torch" and not (x.dtype in _cuda.DTYPES and 1 <= x.shape[-1] <= MAX_HIDDEN):
        backend = auto_fallback(backend)
    return backend


def _draw_seed(device):
    """A (1,) int64 Philox seed for a dropout kernel, drawn from `device`'s default generator.

    torch.manual_seed reproduces it. It stays a tensor on the device (the kernel loads it)
    rather than a Python int: an int would need .item() (a graph break under
    torch.compile, and a sync on the GPU) and an int from the CPU would need a copy.
    """
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


# ----------------------------------------------------------------------------- autograd Functions

class AddLayerNormFunction(torch.autograd.Function):
    """add_layernorm on a kernel backend: saves x, residual, weight, mean, rstd and the seed.

    With `copy` it returns (y, y in x's dtype), written in one pass; the backward adds the
    copy's gradient to y's inside the kernel."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, backend, copy):
        launchers = _launchers(backend)
        seed = _draw_seed(x.device) if dropout_p > 0.0 else None
        y, y_copy, mean, rstd = launchers.add_layernorm_fwd(x, residual, weight, bias, eps, dropout_p, seed, copy)
        ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
        ctx.dropout_p, ctx.backend = dropout_p, backend
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros to read
        return (y, y_copy) if copy else y

    @staticmethod
    def backward(ctx, dy, dy_copy=None):
        refuse_double_backward(ctx, "add_layernorm", dy, dy_copy)
        x, residual, weight, mean, rstd, seed = ctx.saved_tensors
        if dy is None and dy_copy is None:
            return (None,) * 8
        if dy is None:
            dy = torch.zeros(residual.shape, dtype=residual.dtype, device=residual.device)
        with plain_gradients("add_layernorm"):
            dx, dresidual, dweight, dbias = _launchers(ctx.backend).add_layernorm_bwd(
                dy, x, residual, weight, mean, rstd, ctx.dropout_p, seed, dy_copy)
        if ctx.dropout_p == 0.0 and x.dtype == residual.dtype:
            dx = dresidual  # without dropout dL/dx == dL/dresidual; the kernel wrote it once
        return dx, dresidual, dweight, dbias, None, None, None, None


class LayerNormGeluFunction(torch.autograd.Function):
    """layernorm_gelu on a kernel backend: saves x, weight, bias, mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend):
        y, mean, rstd = _launchers(backend).layernorm_gelu_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward(ctx, "layernorm_gelu", dy)
        x, weight, bias, mean, rstd = ctx.saved_tensors
        with plain_gradients("layernorm_gelu"):
            dx, dweight, dbias = _launchers(ctx.backend).layernorm_gelu_bwd(dy, x, weight, bias, mean, rstd)
        return dx, dweight, dbias, None, None


# ----------------------------------------------------------------------------- custom ops (torch.compile)
# triton_op traces its body with fake tensors: the launchers allocate from shapes only and
# launch through wrap_triton (_backend.triton_wrap), so the fake (meta) behaviour is the launcher itself.

if _triton_layernorm is not None:
    from torch import Tensor
    from torch.library import triton_op

    @triton_op("fastbert::add_layernorm_fwd", mutates_args=())
    def _add_layernorm_fwd_op(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float,
                              dropout_p: float, seed: Optional[Tensor],
                              copy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _triton_layernorm.add_layernorm_fwd(x, residual, weight, bias, eps, dropout_p, seed, copy,
                                                   wrap=triton_wrap(x, "add_layernorm"))

    @triton_op("fastbert::add_layernorm_bwd", mutates_args=())
    def _add_layernorm_bwd_op(dy: Tensor, x: Tensor, residual: Tensor, weight: Tensor, mean: Tensor,
                              rstd: Tensor, dropout_p: float, seed: Optional[Tensor],
                              dy_copy: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _triton_layernorm.add_layernorm_bwd(dy, x, residual, weight, mean, rstd, dropout_p, seed, dy_copy,
                                                   wrap=triton_wrap(x, "add_layernorm"))

    @triton_op("fastbert::layernorm_gelu_fwd", mutates_args=())
    def _layernorm_gelu_fwd_op(x: Tensor, weight: Tensor, bias: Tensor,
                               eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return _triton_layernorm.layernorm_gelu_fwd(x, weight, bias, eps, wrap=triton_wrap(x, "layernorm_gelu"))

    @triton_op("fastbert::layernorm_gelu_bwd", mutates_args=())
    def _layernorm_gelu_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                               rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _triton_layernorm.layernorm_gelu_bwd(dy, x, weight, bias, mean, rstd,
                                                    wrap=triton_wrap(x, "layernorm_gelu"))


class _TritonCustomOps:
    """The Triton launchers as registered custom ops: what the Functions call when compiling."""

    @staticmethod
    def add_layernorm_fwd(*args):
        return torch.ops.fastbert.add_layernorm_fwd(*args)

    @staticmethod
    def add_layernorm_bwd(*args):
        return torch.ops.fastbert.add_layernorm_bwd(*args)

    @staticmethod
    def layernorm_gelu_fwd(*args):
        return torch.ops.fastbert.layernorm_gelu_fwd(*args)

    @staticmethod
    def layernorm_gelu_bwd(*args):
        return torch.ops.fastbert.layernorm_gelu_bwd(*args)


# The CUDA launchers as custom ops: opaque to the compiler (fastbert._C takes raw
# pointers), so each has a fake function that allocates its outputs from shapes alone.

@torch.library.custom_op("fastbert::add_layernorm_fwd_cuda", mutates_args=())
def _add_layernorm_fwd_cuda(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float, dropout_p: float, seed: Optional[torch.Tensor],
                            copy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cuda.add_layernorm_fwd(x, residual, weight, bias, eps, dropout_p, seed, copy)


@_add_layernorm_fwd_cuda.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, copy):
    m = x.numel() // x.shape[-1]
    stats = (x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32))
    return residual.new_empty(x.shape), x.new_empty(x.shape if copy else (0,)), *stats


@torch.library.custom_op("fastbert::add_layernorm_bwd_cuda", mutates_args=())
def _add_layernorm_bwd_cuda(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor],
                            dy_copy: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    return _cuda.add_layernorm_bwd(dy, x, residual, weight, mean, rstd, dropout_p, seed, dy_copy)


@_add_layernorm_bwd_cuda.register_fake
def _(dy, x, residual, weight, mean, rstd, dropout_p, seed, dy_copy):
    dx = x.new_empty(x.shape if dropout_p > 0.0 or x.dtype != residual.dtype else (0,))
    return dx, residual.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


@torch.library.custom_op("fastbert::layernorm_gelu_fwd_cuda", mutates_args=())
def _layernorm_gelu_fwd_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cuda.layernorm_gelu_fwd(x, weight, bias, eps)


@_layernorm_gelu_fwd_cuda.register_fake
def _(x, weight, bias, eps):
    m = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("fastbert::layernorm_gelu_bwd_cuda", mutates_args=())
def _layernorm_gelu_bwd_cuda(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    return _cuda.layernorm_gelu_bwd(dy, x, weight, bias, mean, rstd)


@_layernorm_gelu_bwd_cuda.register_fake
def _(dy, x, weight, bias, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


class _CudaCustomOps:
    """The CUDA launchers as registered custom ops: what the Functions call when compiling."""

    @staticmethod
    def add_layernorm_fwd(*args):
        return torch.ops.fastbert.add_layernorm_fwd_cuda(*args)

    @staticmethod
    def add_layernorm_bwd(*args):
        return torch.ops.fastbert.add_layernorm_bwd_cuda(*args)

    @staticmethod
    def layernorm_gelu_fwd(*args):
        return torch.ops.fastbert.layernorm_gelu_fwd_cuda(*args)

    @staticmethod
    def layernorm_gelu_bwd(*args):
        return torch.ops.fastbert.layernorm_gelu_bwd_cuda(*args)


def _launchers(backend):
    """The launcher namespace of `backend` (custom-op dispatch only while compiling)."""
    if backend == "triton":
        return _TritonCustomOps if torch.compiler.is_compiling() else _triton_layernorm
    if backend == "cuda":
        return _CudaCustomOps if torch.compiler.is_compiling() else _cuda
    raise NotImplementedError(f"layernorm: no launchers for backend {backend!r}")


def _check_cuda_rows(op, x):
    """What the CUDA kernels support beyond the op's definition."""
    if x.dtype not in _cuda.DTYPES:
        raise TypeError(f"{op}: the cuda backend takes float32, float16 or bfloat16 x, got {x.dtype}")
    if not 1 <= x.shape[-1] <= _cuda.LAYERNORM_MAX_HIDDEN:
        raise ValueError(f"{op}: the cuda backend takes hidden sizes 1..{_cuda.LAYERNORM_MAX_HIDDEN} "
                         f"(x's last dimension), got {x.shape[-1]}")




# ----------------------------------------------------------------------------- public functions

def add_layernorm(x, residual, weight, bias, eps, dropout_p=0.0, *, copy_in_x_dtype=False):
    """LayerNorm(dropout(x) + residual) over the last dimension. Returns x's shape and dtype
    (the promoted dtype under autocast, see below); with copy_in_x_dtype, the pair
    (y, y.to(x.dtype)).

    x, residual: (..., hidden), same dtype; weight, bias: (hidden,), x's dtype or float32.
    The triton backend takes float32/float16/bfloat16 and hidden <= 4096, computes in fp32,
    needs a contiguous last dimension (other layouts are copied with .contiguous()), and
    draws its dropout seed from the device's default generator (torch.manual_seed
    reproduces it); the backward regenerates the dropout mask from that seed. The cuda
    backend takes the same dtypes and widths (csrc/layernorm*.cu).

    Under autocast x (a Linear's output: bf16/fp16) and residual (the float32 stream)
    differ: the result is that of both promoted to the wider dtype first, as `x + residual`
    promotes in transformers' BertSelfOutput, so the residual stream stays float32 as there.
    The triton and cuda kernels take fp16/bf16 x with an fp32 residual as they are (y and
    dresidual fp32, dx in x's dtype: two passes fewer than promoting, the same numbers);
    the torch backend and other mixes promote. Outside autocast a dtype mix is an error.

    copy_in_x_dtype is for a BERT layer under autocast: y (fp32) is the next residual, while
    the next Linear reads y in the autocast dtype, which is x's. The kernels write that copy
    in the same pass (and take its gradient in the same backward) instead of autocast casting
    y on its own; without a dtype mix the copy is y itself.
    """
    x_dtype = x.dtype if isinstance(x, torch.Tensor) else None
    mixed = _autocast_mixed(x, residual)
    # Checked on the dtypes given (weight: x's or float32), on every backend alike: after the
    # promotion below half weights no longer matched x, and only the torch backend refused them.
    _check_rows("add_layernorm", x, weight, bias, residual, mixed_ok=mixed)
    if mixed and not (x.dtype in _HALF_DTYPES and residual.dtype == torch.float32 and resolve(x.device) != "torch"):
        x, residual = _promote(x, residual)
        if weight.dtype not in (x.dtype, torch.float32):
            weight, bias = weight.float(), bias.float()
        mixed = False
    _check_eps("add_layernorm", eps)
    check_dropout("add_layernorm", dropout_p, torch.compiler.is_compiling())
    backend = _rows_backend(x)
    if backend == "torch":
        y = _torch_backend(add_layernorm_ref, (x, residual, weight, bias), eps, dropout_p)
        return (y, y.to(x_dtype)) if copy_in_x_dtype else y
    if backend == "cuda":
        _check_cuda_rows("add_layernorm", x)
    else:
        _check_kernel_rows("add_layernorm", x)
    x, residual, weight, bias = distinct_for_compile(x, residual, weight, bias)
    if copy_in_x_dtype and mixed:  # the kernels write both
        return AddLayerNormFunction.apply(x, residual, weight, bias, float(eps), float(dropout_p), backend, True)
    y = AddLayerNormFunction.apply(x, residual, weight, bias, float(eps), float(dropout_p), backend, False)
    return (y, y.to(x_dtype)) if copy_in_x_dtype else y


def layernorm_gelu(x, weight, bias, eps):
    """GELU(LayerNorm(x)) over the last dimension (erf GELU). Returns x's shape and dtype.

    x: (..., hidden); weight, bias: (hidden,), x's dtype or float32. The triton backend
    takes float32/float16/bfloat16 and hidden <= 4096, computes in fp32 and needs a
    contiguous last dimension (other layouts are copied with .contiguous()). The cuda
    backend takes the same dtypes and widths (csrc/layernorm*.cu).
    """
    _check_rows("layernorm_gelu", x, weight, bias)
    _check_eps("layernorm_gelu", eps)
    backend = _rows_backend(x)
    if backend == "torch":
        return _torch_backend(layernorm_gelu_ref, (x, weight, bias), eps)
    if backend == "cuda":
        _check_cuda_rows("layernorm_gelu", x)
    else:
        _check_kernel_rows("layernorm_gelu", x)
    x, weight, bias = distinct_for_compile(x, weight, bias)
    return LayerNormGeluFunction.apply(x, weight, bias, float(eps), backend)

"""GELU(x + bias), the FFN intermediate activation: the intermediate dense runs
without its bias and this op adds it, so the bias add costs no extra pass.

x: (..., features); bias: (features,). approximate: "none" (erf, what BERT
uses) or "tanh".

Backends: "torch" runs the reference; "triton" runs kernels/gelu.py through
BiasGeluFunction (shared by every backend: it receives the backend's launchers
bias_gelu_fwd/bias_gelu_bwd). Eager mode calls the launchers directly; under
torch.compile the Function calls them as the custom ops fastbert::bias_gelu_fwd/_bwd
registered with torch.library.triton_op, so fullgraph=True traces through. "cuda" runs
csrc/gelu.cu (fastbert._C) through the same Function with the launchers of
fastbert/ops/_cuda.py; under torch.compile they are the opaque custom ops
fastbert::bias_gelu_{fwd,bwd}_cuda with fake (meta) functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _cuda
from ._backend import auto_fallback, interpreter_on, resolve, triton_kernels, triton_wrap
from ._checks import distinct_for_compile, plain_gradients, refuse_double_backward

# None without usable Triton kernels (_backend.triton_problem says why): the "triton" backend
# is off, the rest works.
_triton_gelu = triton_kernels("gelu")


def bias_gelu_ref(x, bias, approximate="none"):
    return F.gelu(x + bias, approximate=approximate)


# ----------------------------------------------------------------------------- autograd Function

class BiasGeluFunction(torch.autograd.Function):
    """bias_gelu on a kernel backend: saves the input x and bias (the activation is recomputed)."""

    @staticmethod
    def forward(ctx, x, bias, approximate, backend):
        y = _launchers(backend).bias_gelu_fwd(x, bias, approximate)
        ctx.save_for_backward(x, bias)
        ctx.approximate, ctx.backend = approximate, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward(ctx, "bias_gelu", dy)
        x, bias = ctx.saved_tensors
        with plain_gradients("bias_gelu"):
            dx, dbias = _launchers(ctx.backend).bias_gelu_bwd(dy, x, bias, ctx.approximate)
        return dx, dbias, None, None


class _TorchMixedBiasGelu(torch.autograd.Function):
    """The torch backend's bias_gelu of a half x with a float32 bias (a BERT layer under autocast):
    eager PyTorch's numbers (x + bias and the GELU in float32, rounded to x's dtype), but it keeps x
    and bias for the backward, as the kernels do, not the float32 sum GELU keeps (twice x's bytes:
    25 MB a BERT-base layer at 32 x 128 tokens)."""

    generate_vmap_rule = True  # torch.func (grad, jacrev, vmap) takes it, as it takes bias_gelu_ref

    @staticmethod
    def forward(x, bias, approximate):
        return F.gelu(x + bias, approximate=approximate).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, approximate = inputs
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        u = x + bias
        du = torch.ops.aten.gelu_backward(dy.to(u.dtype), u, approximate=ctx.approximate)
        return du.to(x.dtype), du.sum_to_size(bias.shape).to(bias.dtype), None


# ----------------------------------------------------------------------------- custom ops (torch.compile)
# triton_op traces its body with fake tensors: the launchers allocate from shapes only and
# launch through wrap_triton (_backend.triton_wrap), so the fake (meta) behaviour is the launcher itself.

if _triton_gelu is not None:
    from torch import Tensor
    from torch.library import triton_op

    @triton_op("fastbert::bias_gelu_fwd", mutates_args=())
    def _bias_gelu_fwd_op(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
        return _triton_gelu.bias_gelu_fwd(x, bias, approximate, wrap=triton_wrap(x, "bias_gelu"))

    @triton_op("fastbert::bias_gelu_bwd", mutates_args=())
    def _bias_gelu_bwd_op(dy: Tensor, x: Tensor, bias: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
        return _triton_gelu.bias_gelu_bwd(dy, x, bias, approximate, wrap=triton_wrap(x, "bias_gelu"))


class _TritonCustomOps:
    """The Triton launchers as registered custom ops: what the Function calls when compiling."""

    @staticmethod
    def bias_gelu_fwd(*args):
        return torch.ops.fastbert.bias_gelu_fwd(*args)

    @staticmethod
    def bias_gelu_bwd(*args):
        return torch.ops.fastbert.bias_gelu_bwd(*args)


# The CUDA launchers as custom ops: opaque to the compiler (fastbert._C takes raw
# pointers), so each has a fake function that allocates its outputs from shapes alone.

@torch.library.custom_op("fastbert::bias_gelu_fwd_cuda", mutates_args=())
def _bias_gelu_fwd_cuda(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    return _cuda.bias_gelu_fwd(x, bias, approximate)


@_bias_gelu_fwd_cuda.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastbert::bias_gelu_bwd_cuda", mutates_args=())
def _bias_gelu_bwd_cuda(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                        approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _cuda.bias_gelu_bwd(dy, x, bias, approximate)


@_bias_gelu_bwd_cuda.register_fake
def _(dy, x, bias, approximate):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


class _CudaCustomOps:
    """The CUDA launchers as registered custom ops: what the Function calls when compiling."""

    @staticmethod
    def bias_gelu_fwd(*args):
        return torch.ops.fastbert.bias_gelu_fwd_cuda(*args)

    @staticmethod
    def bias_gelu_bwd(*args):
        return torch.ops.fastbert.bias_gelu_bwd_cuda(*args)


def _launchers(backend):
    """The launcher namespace of `backend` (custom-op dispatch only while compiling)."""
    if backend == "triton":
        return _TritonCustomOps if torch.compiler.is_compiling() else _triton_gelu
    if backend == "cuda":
        return _CudaCustomOps if torch.compiler.is_compiling() else _cuda
    raise NotImplementedError(f"bias_gelu: no launchers for backend {backend!r}")




# ----------------------------------------------------------------------------- public function

def bias_gelu(x, bias, approximate="none"):
    """GELU(x + bias): erf GELU, BERT's; approximate="tanh" for the tanh form (gelu_new,
    gelu_pytorch_tanh). Returns x's shape and dtype.

    x: (..., features); bias: (features,), x's dtype or float32 (mixed precision; the
    sum is then formed in float32). The triton backend takes float32/float16/bfloat16 x
    of any width, computes in fp32 and needs a contiguous last dimension (other layouts
    are copied with .contiguous()). The cuda backend takes the same (csrc/gelu.cu).
    """
    for name, t in (("x", x), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bias_gelu: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() == 0:
        raise ValueError("bias_gelu: x must have at least one dimension (features last), got a scalar")
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias must be ({x.shape[-1]},) to match x's last dimension, got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias_gelu: bias is on {bias.device} but x is on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"bias_gelu: x must be a floating-point tensor, got {x.dtype}")
    if bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"bias_gelu: bias must have x's dtype {x.dtype} or float32 (mixed precision), got {bias.dtype}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    backend = resolve(x.device)
    if backend != "torch" and x.dtype not in _cuda.DTYPES:  # both backends' kernels take the same dtypes
        backend = auto_fallback(backend)
    if backend == "torch" or x.shape[-1] == 0:  # no features: an empty result, no kernel to launch
        if bias.dtype != x.dtype and torch.is_grad_enabled() and (x.requires_grad or bias.requires_grad):
            return _TorchMixedBiasGelu.apply(x, bias, approximate)
        return bias_gelu_ref(x, bias, approximate).to(x.dtype)
    if backend == "cuda":
        if x.dtype not in _cuda.DTYPES:
            raise TypeError(f"bias_gelu: the cuda backend takes float32, float16 or bfloat16 x, got {x.dtype}")
        return BiasGeluFunction.apply(*distinct_for_compile(x, bias), approximate, backend)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"bias_gelu: the triton backend takes float32, float16 or bfloat16 x, got {x.dtype}")
    if x.dtype == torch.bfloat16 and interpreter_on():
        # The Triton interpreter computes bf16 wrongly without an error.
        raise TypeError("bias_gelu: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); "
                        "use float32/float16 or a GPU")
    return BiasGeluFunction.apply(*distinct_for_compile(x, bias), approximate, backend)

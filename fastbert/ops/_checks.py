"""Checks the ops share: scalars a user passes (dropout_p, eps, softmax_scale); double backward."""
from __future__ import annotations

import contextlib
import numbers
import struct

import torch

# Plain numbers, and the symbolic ones torch.compile may trace them as.
REAL = (numbers.Real, torch.SymInt, torch.SymFloat)


def is_real(value) -> bool:
    return isinstance(value, REAL) and not isinstance(value, bool)


def check_dropout(op: str, dropout_p, compiling: bool) -> None:
    """compiling: the caller's own `torch.compiler.is_compiling()` (host_sync_allowed says why)."""
    if not is_real(dropout_p):
        raise TypeError(f"{op}: dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    # Not while tracing: a second dropout value makes p a SymFloat there, and Dynamo's stand-in for
    # struct.pack recursed until it crashed. The eager call before the trace has checked the value.
    if not compiling and isinstance(dropout_p, numbers.Real) and dropout_p > 0.0:
        # The kernels take p as a float32, the launchers decide "dropout or not" on the Python float:
        # 1e-46 became 0.0f, the CUDA backward then skipped the dx it was asked for (uninitialised
        # memory came back as x.grad), and 1 - 1e-9 became 1.0f, refused deep in the extension.
        p32 = struct.unpack("f", struct.pack("f", dropout_p))[0]
        if not 0.0 < p32 < 1.0:
            raise ValueError(f"{op}: dropout_p = {dropout_p!r} rounds to {p32} in float32, which the kernels "
                             "compute in: use 0 or a value float32 holds in (0, 1)")


def refuse_double_backward(ctx, op: str, *grads) -> None:
    """Called first in each kernel backward. The kernels' gradients carry no graph of their own, so a
    gradient of a gradient (create_graph=True, then differentiating the result: gradient penalties,
    Hessian-vector products) would treat every second-order term through the op as zero, silently.
    torch.autograd.function.once_differentiable misses the common case (it looks at the incoming
    gradients only, not at the saved inputs). Compiled graphs need no check: AOTAutograd refuses
    double backward itself."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return  # an ordinary backward (create_graph=False) runs with grad mode off
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*ctx.saved_tensors, *grads)):
        raise RuntimeError(f"{op}: the gradient of this fused kernel is not differentiable again "
                           "(backward with create_graph=True); for higher-order gradients run it on the "
                           "'torch' backend: fastbert.ops.use_backend('torch')")


def distinct_for_compile(*tensors):
    """The tensors, each repeat of one made a view of it while torch.compile traces: Dynamo refuses
    an autograd.Function given one tensor twice (attention(x, x, x), add_layernorm(y, y, ...)),
    which broke fullgraph=True. A view holds the same values and its gradient flows back to the
    tensor; eager calls take the tensors as they are."""
    if not torch.compiler.is_compiling():
        return tensors
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and any(t is u for u in out):
            t = t.view_as(t)
        out.append(t)
    return tuple(out)


@contextlib.contextmanager
def plain_gradients(op: str):
    """Around a kernel backward's launch: a batched gradient (autograd.grad(is_grads_batched=True),
    jacobian(vectorize=True) vmap the backward) has no storage for a kernel to read, and failed
    with "Cannot access storage of BatchedTensorImpl". Caught here, not checked before each
    launch: no test is cheap enough for every backward, and nothing else fails this way."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as err:
        text = str(err)
        if "BatchedTensorImpl" not in text and "doesn't have storage" not in text:
            raise
        raise RuntimeError(f"{op}: a batched gradient (autograd.grad(..., is_grads_batched=True), "
                           "jacobian(vectorize=True)) cannot go through this fused kernel; run it on the "
                           "'torch' backend (fastbert.ops.use_backend('torch')) or loop over the gradients") from None

"""The LayerNorm family BERT runs after every sub-layer.

    add_layernorm(x, residual)  = LayerNorm(dropout(x) + residual)     (post-LN residual)
    layernorm_gelu(x)           = GELU(LayerNorm(x))                   (prediction-head transform)

x, residual: (..., hidden); weight, bias: (hidden,). GELU is the exact erf form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve


def add_layernorm_ref(x, residual, weight, bias, eps, dropout_p=0.0, dropout_mask=None):
    """Plain-PyTorch reference; dropout_mask (same shape as x, bool kept) replaces random dropout."""
    if dropout_mask is not None:
        x = x * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        x = F.dropout(x, dropout_p)
    return F.layer_norm(x + residual, weight.shape, weight, bias, eps)


def layernorm_gelu_ref(x, weight, bias, eps):
    return F.gelu(F.layer_norm(x, weight.shape, weight, bias, eps))


def _check_rows(op, x, weight, bias, residual=None):
    tensors = [("x", x), ("weight", weight), ("bias", bias)] + ([("residual", residual)] if residual is not None else [])
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (hidden,):
            raise ValueError(f"{op}: {name} must be ({hidden},) to match x's last dimension, got {tuple(t.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")


def add_layernorm(x, residual, weight, bias, eps, dropout_p=0.0):
    """LayerNorm(dropout(x) + residual) over the last dimension. Returns x's shape and dtype."""
    _check_rows("add_layernorm", x, weight, bias, residual)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"add_layernorm: dropout_p must be in [0, 1), got {dropout_p}")
    backend = resolve(x.device)
    if backend == "torch":
        return add_layernorm_ref(x, residual, weight, bias, eps, dropout_p)
    raise NotImplementedError(f"add_layernorm: backend {backend!r} is not wired yet")


def layernorm_gelu(x, weight, bias, eps):
    """GELU(LayerNorm(x)) over the last dimension. Returns x's shape and dtype."""
    _check_rows("layernorm_gelu", x, weight, bias)
    backend = resolve(x.device)
    if backend == "torch":
        return layernorm_gelu_ref(x, weight, bias, eps)
    raise NotImplementedError(f"layernorm_gelu: backend {backend!r} is not wired yet")

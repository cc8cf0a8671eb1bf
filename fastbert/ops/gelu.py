"""GELU(x + bias), the FFN intermediate activation: the intermediate dense runs
without its bias and this op adds it, so the bias add costs no extra pass.

x: (..., features); bias: (features,). approximate: "none" (erf, what BERT
uses) or "tanh".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve


def bias_gelu_ref(x, bias, approximate="none"):
    return F.gelu(x + bias, approximate=approximate)


def bias_gelu(x, bias, approximate="none"):
    """GELU(x + bias). Returns x's shape and dtype."""
    for name, t in (("x", x), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bias_gelu: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias must be ({x.shape[-1]},) to match x's last dimension, got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias_gelu: bias is on {bias.device} but x is on {x.device}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    backend = resolve(x.device)
    if backend == "torch":
        return bias_gelu_ref(x, bias, approximate)
    raise NotImplementedError(f"bias_gelu: backend {backend!r} is not wired yet")

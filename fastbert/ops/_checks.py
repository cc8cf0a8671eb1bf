"""Argument checks the ops share: scalars a user passes (dropout_p, eps, softmax_scale)."""
from __future__ import annotations

import numbers

import torch

# Plain numbers, and the symbolic ones torch.compile may trace them as.
REAL = (numbers.Real, torch.SymInt, torch.SymFloat)


def is_real(value) -> bool:
    return isinstance(value, REAL) and not isinstance(value, bool)


def check_dropout(op: str, dropout_p) -> None:
    if not is_real(dropout_p):
        raise TypeError(f"{op}: dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")

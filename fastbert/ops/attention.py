"""Bidirectional multi-head attention with a key padding mask.

    out[b, i, h] = sum_j softmax_j(scale * q[b,i,h] . k[b,j,h] + mask_bias[b,j]) * v[b,j,h]

q, k, v are (batch, seqlen, heads, head_dim); mask is (batch, seqlen) bool with
True for real tokens. Padded *query* rows are computed like any other row (as
transformers does); a row whose keys are all masked returns zeros.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import resolve


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


def _attention_torch(q, k, v, mask, dropout_p, softmax_scale):
    """The "torch" backend: SDPA (fast on CPU too) with the reference's semantics."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bias = None
    if mask is not None:
        # A finite bias (not -inf) keeps fully masked rows finite; they are zeroed below.
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~mask, torch.finfo(q.dtype).min)[:, None, None, :]  # (B, 1, 1, S)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=bias, dropout_p=dropout_p, scale=scale,
    ).transpose(1, 2)                                                # (B, S, H, D)
    if mask is not None:
        out = out * mask.any(dim=1)[:, None, None, None].to(out.dtype)
    return out


def _check(q, k, v, mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"attention: q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention: mask must be torch.bool (True = real token), got {mask.dtype}")
        if mask.shape != q.shape[:2]:
            raise ValueError(f"attention: mask must be (batch, seqlen) = {tuple(q.shape[:2])}, got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"attention: mask is on {mask.device} but q is on {q.device}")


def attention(q, k, v, mask=None, dropout_p=0.0, softmax_scale=None):
    """Multi-head attention. q, k, v: (batch, seqlen, heads, head_dim); mask: (batch, seqlen) bool.

    Returns (batch, seqlen, heads, head_dim) in q's dtype.
    """
    _check(q, k, v, mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    backend = resolve(q.device)
    if backend == "torch":
        return _attention_torch(q, k, v, mask, dropout_p, softmax_scale)
    raise NotImplementedError(f"attention: backend {backend!r} is not wired yet")

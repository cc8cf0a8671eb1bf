"""span_score: the k best answer spans per row, for extractive QA prediction.

    span_score(start_logits, end_logits, mask=None, max_answer_len=30, topk=1)
        -> (start_index, end_index, score)

start_logits, end_logits: (batch, L) float16 / bfloat16 / float32, same dtype.
mask: optional (batch, L) bool, True where a position may be part of an answer
(passage tokens); both ends of a span must be allowed.
A span (i, j) needs i <= j < i + max_answer_len; its score is the float32 sum
float32(start_logits[b, i]) + float32(end_logits[b, j]), computed with the
same single fp32 add in every backend.

Returns, each (batch, topk), best first: start_index and end_index int64, score
float32 (always fp32, whatever the input dtype: half-precision scores would tie
spans the fp32 sum tells apart). Ties break towards the smaller start, then the
smaller end, identically in every backend. Slots beyond the allowed spans of a
row (no allowed span, or fewer than topk) hold index -1 and score -inf.

Decisions worth knowing:
- A span whose score is -inf counts as not allowed (index -1, score -inf): a
  -inf logit says "impossible", so -inf logits work as a mask too.
- NaN is not rejected (that would cost a device sync per call). A span whose
  score is NaN ranks above every number, as torch.sort ranks NaN, so a NaN in
  the logits shows up as a NaN best score instead of being silently skipped;
  NaN spans tie among themselves and break ties by (start, end).
- -0.0 and +0.0 tie (they compare equal); the score returned is +0.0.
- Not differentiable: this is a prediction op; outputs carry no gradient.
- Work O(batch * L * max_answer_len); the Triton and CUDA kernels keep O(topk)
  state per row, the torch backend builds the (batch, L, max_answer_len) candidates.
- topk 1..32 (SQuAD post-processing uses 20). Unlike transformers' run_qa
  (top-20 starts x top-20 ends), this is exact: it finds the true best spans.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _cuda
from ._backend import interpreter_on, resolve, triton_importable, triton_wrap

MAX_TOPK = 32
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def span_score_ref(start_logits, end_logits, mask=None, max_answer_len=30, topk=1):
    """Plain-PyTorch reference (the "torch" backend); same outputs, bit for bit, as the kernels
    (a NaN score is NaN in both; its payload bits may differ).

    Builds the (B, L, D) candidate grid cand[b, i, d] = s[b, i] + e[b, i + d], D =
    min(max_answer_len, L), flattens it in (i, d) order (which is (i, j) order)
    and takes the first topk of a stable descending sort, so ties keep the
    smaller (i, j) first.
    """
    B, L = start_logits.shape
    D = min(max_answer_len, L)
    s = start_logits.float()
    e = F.pad(end_logits.float(), (0, D - 1))  # (B, L + D - 1): e[b, i + d] exists for every d < D
    cand = s[:, :, None] + e.unfold(1, D, 1)  # (B, L, D): s_i + e_{i+d}, one fp32 add
    pos = torch.arange(L, device=s.device)
    ok = (pos[:, None] + torch.arange(D, device=s.device)[None, :]) < L  # (L, D): j inside the row
    ok = ok.expand(B, L, D)
    if mask is not None:
        m = F.pad(mask, (0, D - 1), value=False)  # (B, L + D - 1)
        ok = ok & mask[:, :, None] & m.unfold(1, D, 1)
    # `+ 0.0` turns -0.0 into +0.0, the score the kernel returns for a zero sum.
    cand = torch.where(ok, cand + 0.0, float("-inf")).reshape(B, L * D)  # (B, L*D), (i, d) order
    score, flat = torch.sort(cand, dim=1, descending=True, stable=True)
    score, flat = score[:, :topk], flat[:, :topk]
    if L * D < topk:  # fewer candidates than slots: pad with "no span"
        short = topk - L * D
        score = F.pad(score, (0, short), value=float("-inf"))
        flat = F.pad(flat, (0, short), value=0)
    valid = score != float("-inf")  # -inf scores (masked or not) are "no span"
    start = flat // D
    end = start + flat % D
    minus1 = torch.full_like(flat, -1)
    return torch.where(valid, start, minus1), torch.where(valid, end, minus1), score


def _check(start_logits, end_logits, mask, max_answer_len, topk):
    op = "span_score"
    for name, t in (("start_logits", start_logits), ("end_logits", end_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (batch, L), got shape {tuple(t.shape)}")
    if end_logits.dtype != start_logits.dtype:
        raise TypeError(f"{op}: end_logits must have start_logits' dtype {start_logits.dtype}, got {end_logits.dtype}")
    if end_logits.shape != start_logits.shape:
        raise ValueError(f"{op}: end_logits must have start_logits' shape {tuple(start_logits.shape)}, "
                         f"got {tuple(end_logits.shape)}")
    if end_logits.device != start_logits.device:
        raise ValueError(f"{op}: end_logits is on {end_logits.device} but start_logits is on {start_logits.device}")
    if start_logits.shape[1] < 1:
        raise ValueError(f"{op}: L (start_logits.shape[1]) must be >= 1, got shape {tuple(start_logits.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{op}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{op}: mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != start_logits.shape:
            raise ValueError(f"{op}: mask must have start_logits' shape {tuple(start_logits.shape)}, "
                             f"got {tuple(mask.shape)}")
        if mask.device != start_logits.device:
            raise ValueError(f"{op}: mask is on {mask.device} but start_logits is on {start_logits.device}")
    for name, v, hi in (("max_answer_len", max_answer_len, None), ("topk", topk, MAX_TOPK)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
        if v < 1 or (hi is not None and v > hi):
            want = f"between 1 and {hi}" if hi is not None else ">= 1"
            raise ValueError(f"{op}: {name} must be {want}, got {v}")


def _check_triton(start_logits, max_answer_len):
    L = start_logits.shape[1]
    D = min(max_answer_len, L)
    if L * D > 2**31 - 1:  # the kernel's sort key holds the flat (i, d) index in 31 bits
        raise ValueError(f"span_score: triton backend needs L * min(max_answer_len, L) < 2^31, "
                         f"got L={L}, max_answer_len={max_answer_len}")
    if start_logits.dtype == torch.bfloat16 and start_logits.device.type != "cuda" and interpreter_on():
        # The Triton interpreter computes bf16 wrongly without an error.
        raise TypeError("span_score: bfloat16 is not supported by the Triton interpreter; "
                        "use float16/float32 on CPU or run on a GPU")


# Registered op: torch.compile traces into the Triton kernel through it (the body
# also runs on fake tensors, so it only reads shapes). Eager calls skip it: the
# custom-op dispatch costs 10-30 us per call.
if triton_importable():
    from torch.library import triton_op

    @triton_op("fastbert::span_score_triton", mutates_args=())
    def _span_score_triton_op(
        start_logits: torch.Tensor,
        end_logits: torch.Tensor,
        mask: Optional[torch.Tensor],
        max_answer_len: int,
        topk: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from fastbert.kernels.span import span_score_fwd

        return span_score_fwd(start_logits, end_logits, mask, max_answer_len, topk,
                              launch=triton_wrap(start_logits, "span_score"))


def _triton_span_score(start_logits, end_logits, mask, max_answer_len, topk):
    _check_triton(start_logits, max_answer_len)
    if torch.compiler.is_compiling():
        return torch.ops.fastbert.span_score_triton(start_logits, end_logits, mask, max_answer_len, topk)
    from fastbert.kernels.span import span_score_fwd

    return span_score_fwd(start_logits, end_logits, mask, max_answer_len, topk)


# The CUDA kernel (csrc/span.cuh) as a custom op: opaque to the compiler (fastbert._C
# takes raw pointers), with a fake function that allocates the outputs from shapes.
@torch.library.custom_op("fastbert::span_score_cuda", mutates_args=())
def _span_score_cuda_op(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    mask: Optional[torch.Tensor],
    max_answer_len: int,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cuda.span_score_fwd(start_logits, end_logits, mask, max_answer_len, topk)


@_span_score_cuda_op.register_fake
def _(start_logits, end_logits, mask, max_answer_len, topk):
    B = start_logits.shape[0]
    return (start_logits.new_empty((B, topk), dtype=torch.int64), start_logits.new_empty((B, topk), dtype=torch.int64),
            start_logits.new_empty((B, topk), dtype=torch.float32))


def _cuda_span_score(start_logits, end_logits, mask, max_answer_len, topk):
    if torch.compiler.is_compiling():
        return torch.ops.fastbert.span_score_cuda(start_logits, end_logits, mask, max_answer_len, topk)
    return _cuda.span_score_fwd(start_logits, end_logits, mask, max_answer_len, topk)


def span_score(start_logits, end_logits, mask=None, max_answer_len=30, topk=1):
    """The `topk` best spans (i <= j < i + max_answer_len, both ends allowed by `mask`) per row.

    start_logits, end_logits: (batch, L) float16/bfloat16/float32; mask: (batch, L) bool or None.
    Returns (start_index, end_index, score), each (batch, topk): int64, int64, float32; best
    first, ties towards smaller (start, end); missing spans are (-1, -1, -inf). See the module
    docstring for -inf, NaN and -0.0.
    """
    _check(start_logits, end_logits, mask, max_answer_len, topk)
    start_logits, end_logits = start_logits.detach(), end_logits.detach()  # prediction op: no gradient
    backend = resolve(start_logits.device)
    if backend == "torch":
        return span_score_ref(start_logits, end_logits, mask, max_answer_len, topk)
    if backend == "triton":
        return _triton_span_score(start_logits, end_logits, mask, max_answer_len, topk)
    return _cuda_span_score(start_logits, end_logits, mask, max_answer_len, topk)

"""Span-score benchmark: the n best answer spans of extractive QA.

Shapes: a SQuAD v1.1 dev-sized set, 10,570 windows of 384 tokens, n-best 20,
max answer length 30 (what transformers' run_qa post-processes), and one
evaluation batch of 32 windows. The mask allows the context tokens only: each
window's question takes 10..40 leading tokens and its context ends between
L/2 and L (the last windows of a document are short).

Work (GB/s): read start and end logits (2*B*L*e), the mask (B*L bytes); write
the top-k (start, end, score): B*k*(8 + 8 + 4) bytes.

Implementations:
  triton / cuda  fastbert.ops.span.span_score on that backend (exact)
  eager          span_score_ref, imported: (B, L, max_answer_len) candidates + stable sort (exact)
  compile        torch.compile(span_score_ref)
  outer_sum      the usual PyTorch idiom: (B, L, L) outer sum, band mask j - i < max_answer_len, topk (exact);
                 issue 6's "eager outer-sum" baseline (rows carry speedup_vs["outer_sum"])
  outer_sum_compile  torch.compile(span_outer_sum) (key shapes, as compile)
  python_nbest   transformers' utils_qa loop: per window the top-20 starts and top-20 ends by argsort,
                 then a Python loop over the 400 pairs (inside the context, end >= start, length
                 <= 30), sorted by start + end. Approximate: it misses a best span whose start or
                 end is outside the top 20. Timed from GPU tensors (the copy to numpy included),
                 a few calls only: it is slow (rows carry speedup_vs["python_nbest"]).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from . import harness
from fastbert.ops import use_backend
from fastbert.ops.span import span_score, span_score_ref

OP = "span_score"
MAX_ANSWER_LEN, TOPK = 30, 20
SQUAD = ("squad-dev", 10570, 384)
BATCH = ("batch", 32, 384)
QUICK = ("tiny", 8, 64)


def bytes_moved(B: int, L: int, e: int, topk: int) -> float:
    return 2 * B * L * e + B * L + B * topk * (8 + 8 + 4)


def make_inputs_fn(B, L, dtype, device, seed):
    """make_inputs(k) -> (start_logits, end_logits, mask): set k, seeded; mask True on context tokens."""
    def make_inputs(k):
        g = torch.Generator(device=device).manual_seed(seed + k)
        start = (4 * torch.randn(B, L, device=device, generator=g)).to(dtype)
        end = (4 * torch.randn(B, L, device=device, generator=g)).to(dtype)
        pos = torch.arange(L, device=device)[None, :]
        first = torch.randint(min(10, L // 4), max(min(40, L // 2), min(10, L // 4) + 1), (B, 1),
                              device=device, generator=g)
        last = torch.randint(L // 2, L + 1, (B, 1), device=device, generator=g)
        return start, end, (pos >= first) & (pos < last)
    return make_inputs


def span_outer_sum(start_logits, end_logits, mask, max_answer_len=MAX_ANSWER_LEN, topk=TOPK):
    """The eager idiom: score every (i, j), mask the band i <= j < i + max_answer_len, topk."""
    B, L = start_logits.shape
    scores = start_logits.float()[:, :, None] + end_logits.float()[:, None, :]       # (B, L, L)
    pos = torch.arange(L, device=start_logits.device)
    band = (pos[None, :] >= pos[:, None]) & (pos[None, :] - pos[:, None] < max_answer_len)  # (L, L)
    allowed = band[None] & mask[:, :, None] & mask[:, None, :]                         # (B, L, L)
    top, flat = scores.masked_fill(~allowed, float("-inf")).flatten(1).topk(topk, dim=1)  # (B, topk)
    return flat // L, flat % L, top


def span_python_nbest(start_logits, end_logits, mask, max_answer_len=MAX_ANSWER_LEN, n_best=TOPK):
    """transformers' run_qa post-processing (utils_qa.postprocess_qa_predictions), logits part only."""
    starts = start_logits.float().cpu().numpy()
    ends = end_logits.float().cpu().numpy()
    allowed = mask.cpu().numpy()
    predictions = []
    for s, e, ok in zip(starts, ends, allowed):
        start_indexes = np.argsort(s)[-1:-n_best - 1:-1].tolist()
        end_indexes = np.argsort(e)[-1:-n_best - 1:-1].tolist()
        prelim = []
        for i in start_indexes:
            for j in end_indexes:
                # utils_qa: skip answers outside the context (offset_mapping None) ...
                if not ok[i] or not ok[j]:
                    continue
                # ... with negative length or longer than max_answer_length.
                if j < i or j - i + 1 > max_answer_len:
                    continue
                prelim.append((float(s[i] + e[j]), i, j))
        predictions.append(sorted(prelim, key=lambda x: x[0], reverse=True)[:n_best])
    return predictions


def _on(backend):
    def run(start, end, mask):
        with use_backend(backend):
            return span_score(start, end, mask, MAX_ANSWER_LEN, TOPK)
    return run


def _ref(start, end, mask):
    return span_score_ref(start, end, mask, MAX_ANSWER_LEN, TOPK)


def cases(profile: str, cfg: harness.Settings, compile_scope: str = "key") -> list[harness.Case]:
    device = cfg.device
    if profile == "quick":
        shapes, dtypes = [QUICK], [torch.float32]
    else:
        shapes, dtypes = [SQUAD, BATCH], [torch.float32, torch.bfloat16]
    out = []
    for dtype in dtypes:
        for name, B, L in shapes:
            key = (name, B, L) in (SQUAD, QUICK) and dtype == dtypes[0]
            impls = harness.kernel_rows(device, _on)
            impls["eager"] = (_ref, "ok", "span_score_ref from fastbert.ops.span")
            compile_here = compile_scope == "all" or (compile_scope == "key" and key)
            if compile_here:
                impls["compile"] = (harness.compiled(_ref, cfg.compile_backend), "ok",
                                    f"torch.compile(span_score_ref, backend={cfg.compile_backend})")
            impls["outer_sum"] = (span_outer_sum, "ok", "(B, L, L) outer sum + band mask + topk")
            if compile_here:
                impls["outer_sum_compile"] = (harness.compiled(span_outer_sum, cfg.compile_backend), "ok",
                                              f"torch.compile(span_outer_sum, backend={cfg.compile_backend})")
            if dtype == dtypes[0]:
                impls["python_nbest"] = (span_python_nbest, "ok",
                                         "transformers utils_qa loop, top-20 x top-20 (approximate)")
            make_inputs = make_inputs_fn(B, L, dtype, device, seed=B + L)
            e = torch.empty((), dtype=dtype).element_size()
            for impl, (fn, status, note) in impls.items():
                out.append(harness.Case(
                    op=OP, impl=impl, label=f"{name} B{B} L{L} k{TOPK}",
                    shape={"B": B, "L": L, "topk": TOPK, "max_answer_len": MAX_ANSWER_LEN},
                    dtype=dtype, mode="fwd", fn=fn, make_inputs=make_inputs,
                    work=bytes_moved(B, L, e, TOPK), unit=harness.GBPS, tier=1 if key else 2,
                    status=status, note=note,
                    timer="host" if impl == "python_nbest" else "device",
                    max_reps=(1 if B > 1000 else 5) if impl == "python_nbest" else None))
    return out


# ----------------------------------------------------------------------------- pytest-benchmark entry

@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda", "eager", "compile", "outer_sum", "outer_sum_compile",
                                  "python_nbest"])
def test_span_score(benchmark, impl):
    found = [c for c in cases("budget", harness.Settings.make(torch.device("cuda")), compile_scope="key")
             if c.impl == impl and c.tier == 1]
    if not found:
        pytest.skip(f"{impl} is not available here")
    # The Python loop takes seconds per call over the SQuAD set: a few rounds.
    harness.pytest_benchmark(benchmark, found[0], rounds=3 if impl == "python_nbest" else 30)

"""span_score: torch and Triton backends against a brute-force enumeration of every span.

The op returns indices and exact fp32 sums, so every comparison here is exact
(torch.equal), including the order of ties.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICE, KERNEL_DTYPES, ON_GPU, poison
from fastbert.ops import use_backend
from fastbert.ops.span import span_score, span_score_ref

pytest.importorskip("triton")
import fastbert.kernels.span as kernels  # noqa: E402  (a broken kernel module must fail, not skip)

NEG_INF = float("-inf")


def brute_force(s, e, mask, max_answer_len, topk):
    """Every allowed (i, j), scored with one float32 add, sorted by (-score, i, j)."""
    s32 = s.float().cpu().numpy()
    e32 = e.float().cpu().numpy()
    m = None if mask is None else mask.cpu().numpy()
    B, L = s32.shape
    start = np.full((B, topk), -1, dtype=np.int64)
    end = np.full((B, topk), -1, dtype=np.int64)
    score = np.full((B, topk), NEG_INF, dtype=np.float32)
    for b in range(B):
        spans = []
        for i in range(L):
            for j in range(i, min(L, i + max_answer_len)):
                if m is not None and not (m[b, i] and m[b, j]):
                    continue
                sc = np.float32(s32[b, i]) + np.float32(e32[b, j])  # numpy float32 + float32 -> float32
                if sc != NEG_INF:  # -inf scores are "no span" by definition
                    spans.append((-float(sc), i, j, sc))
        spans.sort(key=lambda t: t[:3])
        for k, (_, i, j, sc) in enumerate(spans[:topk]):
            start[b, k], end[b, k], score[b, k] = i, j, sc
    return torch.from_numpy(start), torch.from_numpy(end), torch.from_numpy(score)


def assert_same(ours, ref, what):
    names = ("start_index", "end_index", "score")
    for name, o, r in zip(names, ours, ref):
        o = o.cpu()
        assert o.dtype == r.dtype, f"{what}: {name} dtype {o.dtype}, expected {r.dtype}"
        assert o.shape == r.shape, f"{what}: {name} shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        same = (o == r) | (torch.isnan(o) & torch.isnan(r)) if o.is_floating_point() else (o == r)
        if not bool(same.all()):
            b, k = (int(x) for x in (~same).nonzero()[0])
            raise AssertionError(f"{what}: {name} differs first at row {b}, slot {k}:\n"
                                 f"ours  start={ours[0][b].tolist()}\n      end={ours[1][b].tolist()}\n"
                                 f"      score={ours[2][b].tolist()}\n"
                                 f"ref   start={ref[0][b].tolist()}\n      end={ref[1][b].tolist()}\n"
                                 f"      score={ref[2][b].tolist()}")


def run_kernel(s, e, mask, max_answer_len, topk, block_i=None, block_d=None):
    """The Triton launcher writing into NaN/sentinel-poisoned outputs: an unwritten slot fails."""
    B = s.shape[0]
    out = (poison(torch.empty((B, topk), dtype=torch.int64, device=s.device)),
           poison(torch.empty((B, topk), dtype=torch.int64, device=s.device)),
           poison(torch.empty((B, topk), dtype=torch.float32, device=s.device)))
    got = kernels.span_score_fwd(s, e, mask, max_answer_len, topk, out=out, block_i=block_i, block_d=block_d)
    assert all(g is o for g, o in zip(got, out)), "launcher must fill the given outputs"
    return got


def make_inputs(seed, B, L, values, mask_kind, dtype=torch.float32):
    """values: "ties" (a tiny set: many equal scores), "ties_inf" (plus -inf logits), "randn".
    mask_kind: "none", "random", "empty_rows" (random, some rows with nothing allowed), "passage"."""
    g = torch.Generator().manual_seed(seed)
    if values == "randn":
        s, e = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    else:
        pool = torch.tensor([-1.0, 0.0, 0.5, 1.0] + ([NEG_INF] if values == "ties_inf" else []))
        s = pool[torch.randint(len(pool), (B, L), generator=g)]
        e = pool[torch.randint(len(pool), (B, L), generator=g)]
    mask = None
    if mask_kind in ("random", "empty_rows"):
        mask = torch.rand(B, L, generator=g) < float(torch.rand((), generator=g))
        if mask_kind == "empty_rows":
            mask[torch.rand(B, generator=g) < 0.5] = False
    elif mask_kind == "passage":  # [CLS] question [SEP] passage [SEP] padding
        pos = torch.arange(L)
        lo = torch.randint(0, L, (B, 1), generator=g)
        hi = lo + torch.randint(0, L + 1, (B, 1), generator=g)
        mask = (pos >= lo) & (pos < hi)
    return s.to(dtype).to(DEVICE), e.to(dtype).to(DEVICE), None if mask is None else mask.to(DEVICE)


cases = dict(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    L=st.integers(1, 70),
    max_answer_len=st.integers(1, 40),
    topk=st.integers(1, 32),
    values=st.sampled_from(["ties", "ties", "ties_inf", "randn"]),
    mask_kind=st.sampled_from(["none", "random", "empty_rows", "passage"]),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**cases)
def test_torch_backend_matches_brute_force(seed, B, L, max_answer_len, topk, values, mask_kind):
    s, e, mask = make_inputs(seed, B, L, values, mask_kind)
    with use_backend("torch"):
        ours = span_score(s, e, mask, max_answer_len, topk)
    assert_same(ours, brute_force(s, e, mask, max_answer_len, topk), "torch backend")


# Small tiles make rows of up to 70 positions cross several (BLOCK_I, BLOCK_D) tiles.
# (Single-element tiles cost ~L*D interpreter steps per row: they get a small fixed case below.)
TILES = [(None, None), (4, 4), (16, 2), (2, 16), (8, 8)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**cases, tile=st.sampled_from(TILES))
def test_triton_matches_brute_force(seed, B, L, max_answer_len, topk, values, mask_kind, tile):
    s, e, mask = make_inputs(seed, B, L, values, mask_kind)
    ours = run_kernel(s, e, mask, max_answer_len, topk, *tile)
    assert_same(ours, brute_force(s, e, mask, max_answer_len, topk), f"triton tile={tile}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("L,max_answer_len,topk,tile", [
    (1, 1, 1, (None, None)),
    (1, 30, 32, (None, None)),  # one candidate, 31 empty slots
    (9, 4, 32, (1, 1)),  # one-element tiles; fewer spans (30) than slots
    (37, 5, 7, (16, 4)),  # L and D not multiples of the tile
    (53, 30, 20, (8, 16)),
])
def test_triton_edge_sizes(dtype, L, max_answer_len, topk, tile):
    s, e, mask = make_inputs(L, 3, L, "randn", "random", dtype)
    expected = brute_force(s, e, mask, max_answer_len, topk)
    assert_same(run_kernel(s, e, mask, max_answer_len, topk, *tile), expected, f"triton {dtype}")
    with use_backend("triton"):
        assert_same(span_score(s, e, mask, max_answer_len, topk), expected, f"span_score triton {dtype}")


@pytest.mark.parametrize("values", ["randn", "ties"])
def test_squad_size_row(values):
    """L=384, topk=20, max_answer_len=30 (SQuAD post-processing), passage masks."""
    s, e, mask = make_inputs(7, 2, 384, values, "passage")
    mask[0, 10:300] = True  # one long passage, one random window
    expected = brute_force(s, e, mask, 30, 20)
    assert_same(run_kernel(s, e, mask, 30, 20), expected, "triton")
    with use_backend("torch"):
        assert_same(span_score(s, e, mask, 30, 20), expected, "torch")


def test_strided_logits_from_qa_head():
    """start/end are views into the (B, L, 2) qa_outputs tensor: position stride 2, not 1."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 45, 2, generator=g).to(DEVICE)
    s, e = logits.unbind(-1)
    mask = (torch.rand(6, 45, generator=g) > 0.2).to(DEVICE)[::2]  # a strided mask too
    assert s.stride() == (90, 2) and mask.stride() == (90, 1)
    expected = brute_force(s, e, mask, 9, 11)
    assert_same(run_kernel(s, e, mask, 9, 11), expected, "triton strided")
    with use_backend("torch"):
        assert_same(span_score(s, e, mask, 9, 11), expected, "torch strided")


def own_strides_inputs(device):
    """(s, e, mask), each with its own strides: start logits from a QA head's (B, L, 2) output
    (stride 2), contiguous end logits, and a mask taking every other element of a wider one."""
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 45, 2, generator=g).to(device)[..., 0]
    e = torch.randn(3, 45, generator=g).to(device)
    mask = (torch.rand(3, 90, generator=g) > 0.3).to(device)[:, ::2]
    assert s.stride() == (90, 2) and e.stride() == (45, 1) and mask.stride() == (90, 2)
    return s, e, mask


def test_each_input_keeps_its_own_strides():
    """start logits from a QA head's (B, L, 2) output, contiguous end logits and a mask with a
    position stride of 2: each read with its own strides (end logits with the start logits'
    stride, or the mask with a unit one, read other values)."""
    s, e, mask = own_strides_inputs(DEVICE)
    assert_same(run_kernel(s, e, mask, 9, 11), brute_force(s, e, mask, 9, 11), "triton own strides")


def test_position_strides_past_int32_offsets():
    """A mask whose position stride puts its last element past 2**31 (column-major logits of a few
    million windows look like this): the kernel's offsets are 64-bit, not wrapped. Only the bytes it
    reads are touched; the rest of the 2 GiB storage is never faulted in."""
    L, stride = 3, 2**30 + 1  # element 2 at 2**31 + 2
    storage = torch.empty((L - 1) * stride + 1, dtype=torch.bool, device=DEVICE)
    mask = storage.as_strided((1, L), (1, stride))
    mask[0] = torch.tensor([False, True, True])
    s = torch.tensor([[5.0, 1.0, 2.0]], device=DEVICE)
    e = torch.tensor([[0.0, 3.0, 7.0]], device=DEVICE)
    expected = brute_force(s, e, mask, 3, 4)
    assert expected[0].tolist() == [[2, 1, 1, -1]] and expected[1].tolist() == [[2, 2, 1, -1]]
    assert_same(run_kernel(s, e, mask, 3, 4), expected, "triton, mask stride past 2**31")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the interpreter
def test_nan_inf_and_signed_zero_agree_across_backends():
    """NaN spans rank first (as torch.sort ranks NaN), -inf spans are "no span", -0.0 ties +0.0."""
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[0.0, -0.0, 1.0, nan, 2.0, -inf, inf, 0.5],
                      [-0.0, -0.0, 0.0, -0.0, 0.0, 0.0, -0.0, -0.0],
                      [-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf]], device=DEVICE)
    e = torch.tensor([[-0.0, 0.0, nan, 1.0, -inf, 3.0, -inf, 0.5],
                      [-0.0, 0.0, -0.0, -0.0, 0.0, -0.0, 0.0, -0.0],
                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]], device=DEVICE)
    with use_backend("torch"):
        ref = span_score(s, e, None, 4, 32)
    ours = run_kernel(s, e, None, 4, 32)
    assert_same(ours, tuple(t.cpu() for t in ref), "triton vs torch with NaN/inf/-0.0")
    assert math.isnan(ref[2][0, 0].item()) and (ref[0][0, 0].item(), ref[1][0, 0].item()) == (0, 2)  # 0.0 + NaN
    assert torch.equal(ref[0][2], torch.full((32,), -1, device=ref[0].device))  # all -inf: no span
    for got in (ref, ours):  # zero sums come back as +0.0 (26 spans of length <= 4 in a row of 8)
        assert got[2][1, :26].eq(0).all() and not torch.signbit(got[2][1, :26]).any()
    assert ref[0][1, :4].tolist() == [0, 0, 0, 0] and ref[1][1, :4].tolist() == [0, 1, 2, 3]  # all tie: (i, j) order


def test_fewer_spans_than_topk_and_empty_rows():
    s = torch.arange(6.0, device=DEVICE).repeat(2, 1)
    mask = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    mask[0, [1, 4]] = True  # spans (1,1), (1,4), (4,4) with max_answer_len 4: (1,4) is length 4
    expected = (torch.tensor([[4, 1, 1, -1, -1], [-1] * 5]), torch.tensor([[4, 4, 1, -1, -1], [-1] * 5]),
                torch.tensor([[8.0, 5.0, 2.0, NEG_INF, NEG_INF], [NEG_INF] * 5]))
    assert_same(run_kernel(s, s, mask, 4, 5), expected, "triton")
    with use_backend("torch"):
        assert_same(span_score(s, s, mask, 4, 5), expected, "torch")


def test_padding_slots_are_not_stored_past_the_outputs():
    """topk=3 keeps K_PAD=4 slots: the 4th must not be stored (it would land on the next row's
    slot 0, and past the end after the last row). The outputs are the front of larger poisoned
    buffers: the tails must stay poisoned."""
    B, topk = 2, 3
    s, e, _ = make_inputs(5, B, 9, "randn", "none")
    bufs = [poison(torch.empty(B * topk + 8, dtype=dt, device=s.device))
            for dt in (torch.int64, torch.int64, torch.float32)]
    out = tuple(b[:B * topk].view(B, topk) for b in bufs)
    got = kernels.span_score_fwd(s, e, None, 4, topk, out=out)
    assert all(g is o for g, o in zip(got, out))
    assert_same(got, brute_force(s, e, None, 4, topk), "triton")
    for name, b in zip(("start", "end", "score"), bufs):
        tail = b[B * topk:].cpu()
        assert (tail.isnan().all() if tail.is_floating_point() else (tail == -12345).all()), f"{name} written past the end"


def test_auto_backend_on_cpu_is_torch_and_outputs_have_no_grad():
    s = torch.randn(2, 9, requires_grad=True)
    out = span_score(s, s * 2, topk=3)
    assert [t.dtype for t in out] == [torch.int64, torch.int64, torch.float32]
    assert not out[2].requires_grad


@pytest.mark.skipif(ON_GPU, reason="the interpreter refusal only applies without a GPU")
def test_triton_interpreter_refuses_bf16():
    x = torch.zeros(1, 4, dtype=torch.bfloat16)
    with use_backend("triton"), pytest.raises(TypeError, match="bfloat16"):
        span_score(x, x)


def test_bad_inputs():
    x = torch.zeros(2, 5)
    m = torch.ones(2, 5, dtype=torch.bool)
    bad = [
        (TypeError, "start_logits must be a torch.Tensor", dict(start_logits=[[0.0]])),
        (TypeError, "start_logits must be float16, bfloat16 or float32, got torch.float64",
         dict(start_logits=x.double())),
        (TypeError, "end_logits must be float16, bfloat16 or float32, got torch.int64", dict(end_logits=x.long())),
        (TypeError, "end_logits must have start_logits' dtype", dict(end_logits=x.half())),
        (ValueError, r"start_logits must be 2-D \(batch, L\), got shape \(5,\)", dict(start_logits=x[0])),
        (ValueError, r"end_logits must have start_logits' shape \(2, 5\), got \(2, 4\)", dict(end_logits=x[:, :4])),
        (ValueError, "L .* must be >= 1", dict(start_logits=x[:, :0], end_logits=x[:, :0])),
        (TypeError, "mask must be a bool tensor, got torch.float32", dict(mask=x)),
        (TypeError, "mask must be a torch.Tensor or None", dict(mask=[True])),
        (ValueError, r"mask must have start_logits' shape \(2, 5\), got \(1, 5\)", dict(mask=m[:1])),
        (ValueError, "max_answer_len must be >= 1, got 0", dict(max_answer_len=0)),
        (TypeError, "max_answer_len must be an int, got float", dict(max_answer_len=3.0)),
        (ValueError, "topk must be between 1 and 32, got 33", dict(topk=33)),
        (ValueError, "topk must be between 1 and 32, got 0", dict(topk=0)),
        (TypeError, "topk must be an int, got bool", dict(topk=True)),
    ]
    for exc, match, change in bad:
        kwargs = dict(start_logits=x, end_logits=x, mask=m, max_answer_len=3, topk=2)
        kwargs.update(change)
        with pytest.raises(exc, match=match):
            span_score(**kwargs)
    # A device mix (meta stands in for a second device on machines with one).
    with pytest.raises(ValueError, match="end_logits is on meta but start_logits is on cpu"):
        span_score(x, x.to("meta"))
    with pytest.raises(ValueError, match="mask is on meta but start_logits is on cpu"):
        span_score(x, x, m.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("values", ["randn", "ties_inf"])
def test_gpu_squad_size_matches_torch_backend(dtype, values):
    """batch 1024, L 384, topk 20, max_answer_len 30: Triton equals the torch backend exactly."""
    s, e, mask = make_inputs(11, 1024, 384, values, "passage", dtype)
    with use_backend("torch"):
        ref = span_score(s, e, mask, 30, 20)
    out = run_kernel(s, e, mask, 30, 20)
    assert_same(out, tuple(t.cpu() for t in ref), f"gpu triton {dtype} {values}")
    with use_backend("triton"):
        assert_same(span_score(s, e, mask, 30, 20), tuple(t.cpu() for t in ref), "gpu span_score")
        assert_same(span_score(s, e, None, 30, 20), tuple(t.cpu() for t in span_score_ref(s, e, None, 30, 20)),
                    "gpu span_score without mask")
    rows = [0, 1, 1023]  # and a few rows against the brute force itself
    assert_same(tuple(t[rows] for t in out), brute_force(s[rows], e[rows], mask[rows], 30, 20), "gpu brute force")


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """torch.compile traces into the Triton kernel through fastbert::span_score_triton.

    Compiles the triton dispatch target rather than span_score itself: backend resolution
    reads a ContextVar, which dynamo (torch 2.11) cannot trace with fullgraph=True."""
    import fastbert.ops.span as span_mod

    s, e, mask = make_inputs(5, 64, 384, "randn", "passage")
    expected = tuple(t.cpu() for t in span_score_ref(s, e, mask, 30, 20))
    compiled = torch.compile(span_mod._triton_span_score, fullgraph=True, dynamic=False)
    assert_same(compiled(s, e, mask, 30, 20), expected, "compiled triton")
    op = torch.compile(lambda a, b, m: torch.ops.fastbert.span_score_triton(a, b, m, 30, 20), fullgraph=True)
    assert_same(op(s, e, mask), expected, "compiled registered op")

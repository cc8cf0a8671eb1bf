"""span_score on the "cuda" backend (csrc/span.cuh through fastbert._C).

The op returns indices and exact fp32 sums, so every comparison is exact (torch.equal,
the order of ties included): against a brute-force enumeration of every span, the torch
backend and (on the GPU) the Triton backend. Outputs are poisoned (NaN / a sentinel)
inside guard zones that must stay poisoned. Shapes reach both launch settings (one warp
per row when rows are many, four warps merging their lists when rows are few) and every
lane layout (short spans put several start positions in one warp row).

The `cuda_device` fixture runs each test twice: "gpu" (marked gpu) and "emu" (no GPU: the
kernel compiled with g++ against the CPU emulation of tests/test_cuda_build.py).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ON_GPU, poison
from test_span import assert_same, brute_force, make_inputs, own_strides_inputs

import fastbert.ops._cuda as C
from fastbert.ops import use_backend
from fastbert.ops.span import span_score, span_score_ref

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_cuda(s, e, mask, max_answer_len, topk):
    """The CUDA launcher writing into poisoned outputs followed by poisoned guard zones: an
    unwritten slot, or a write past the end, fails."""
    B = s.shape[0]
    n, guard = B * topk, 64
    bufs = [poison(torch.empty(n + guard, dtype=dtype, device=s.device))
            for dtype in (torch.int64, torch.int64, torch.float32)]
    out = tuple(buf[:n].view(B, topk) for buf in bufs)
    got = C.span_score_fwd(s, e, mask, max_answer_len, topk, out=out)
    assert all(g is o for g, o in zip(got, out)), "launcher must fill the given outputs"
    assert all(torch.equal(buf[n:], poison(torch.empty_like(buf[n:]))) if not buf.is_floating_point()
               else torch.isnan(buf[n:]).all() for buf in bufs), "the kernel wrote past the outputs"
    return got


cases = dict(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    L=st.integers(1, 70),
    max_answer_len=st.integers(1, 40),
    topk=st.integers(1, 32),
    values=st.sampled_from(["ties", "ties", "ties_inf", "randn"]),
    mask_kind=st.sampled_from(["none", "random", "empty_rows", "passage"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(**cases)
def test_matches_brute_force(cuda_device, seed, B, L, max_answer_len, topk, values, mask_kind):
    s, e, mask = (t if t is None else t.to(cuda_device) for t in make_inputs(seed, B, L, values, mask_kind))
    assert_same(run_cuda(s, e, mask, max_answer_len, topk), brute_force(s, e, mask, max_answer_len, topk), "cuda")


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("L,max_answer_len,topk", [
    (1, 1, 1), (1, 30, 32), (9, 4, 32), (37, 5, 7), (53, 30, 20), (70, 1, 5), (64, 64, 32), (33, 17, 3),
])
@pytest.mark.parametrize("B", [3, 5])
def test_edge_sizes(cuda_device, B, dtype, L, max_answer_len, topk):
    """B = 3 rows: four warps per row in the emulation (2 SMs); 5: one warp per row."""
    s, e, mask = (t.to(cuda_device) for t in make_inputs(L, B, L, "randn", "random", dtype))
    expected = brute_force(s, e, mask, max_answer_len, topk)
    assert_same(run_cuda(s, e, mask, max_answer_len, topk), expected, f"cuda {dtype}")
    with use_backend("cuda"):
        assert_same(span_score(s, e, mask, max_answer_len, topk), expected, f"span_score cuda {dtype}")


@pytest.mark.parametrize("values", ["randn", "ties"])
def test_squad_size_row(cuda_device, values):
    s, e, mask = (t.to(cuda_device) for t in make_inputs(7, 2, 384, values, "passage"))
    mask[0, 10:300] = True
    assert_same(run_cuda(s, e, mask, 30, 20), brute_force(s, e, mask, 30, 20), "cuda")


def test_strided_logits_from_qa_head(cuda_device):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 45, 2, generator=g).to(cuda_device)
    s, e = logits.unbind(-1)
    mask = (torch.rand(6, 45, generator=g) > 0.2).to(cuda_device)[::2]
    assert s.stride() == (90, 2) and mask.stride() == (90, 1)
    assert_same(run_cuda(s, e, mask, 9, 11), brute_force(s, e, mask, 9, 11), "cuda strided")


def test_each_input_keeps_its_own_strides(cuda_device):
    """start logits from a QA head's (B, L, 2) output, contiguous end logits and a mask with a
    non-unit stride (every other element of a wider mask): each read with its own strides."""
    s, e, mask = own_strides_inputs(cuda_device)
    assert_same(run_cuda(s, e, mask, 9, 11), brute_force(s, e, mask, 9, 11), "cuda own strides")


def test_nan_inf_and_signed_zero_agree_with_torch_backend(cuda_device):
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[0.0, -0.0, 1.0, nan, 2.0, -inf, inf, 0.5],
                      [-0.0, -0.0, 0.0, -0.0, 0.0, 0.0, -0.0, -0.0],
                      [-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf]], device=cuda_device)
    e = torch.tensor([[-0.0, 0.0, nan, 1.0, -inf, 3.0, -inf, 0.5],
                      [-0.0, 0.0, -0.0, -0.0, 0.0, -0.0, 0.0, -0.0],
                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]], device=cuda_device)
    with use_backend("torch"):
        ref = span_score(s, e, None, 4, 32)
    ours = run_cuda(s, e, None, 4, 32)
    assert_same(ours, tuple(t.cpu() for t in ref), "cuda vs torch with NaN/inf/-0.0")
    assert math.isnan(ours[2][0, 0].item()) and (ours[0][0, 0].item(), ours[1][0, 0].item()) == (0, 2)
    assert ours[2][1, :26].eq(0).all() and not torch.signbit(ours[2][1, :26]).any()


def test_fewer_spans_than_topk_and_empty_rows(cuda_device):
    s = torch.arange(6.0, device=cuda_device).repeat(2, 1)
    mask = torch.zeros(2, 6, dtype=torch.bool, device=cuda_device)
    mask[0, [1, 4]] = True
    expected = (torch.tensor([[4, 1, 1, -1, -1], [-1] * 5]), torch.tensor([[4, 4, 1, -1, -1], [-1] * 5]),
                torch.tensor([[8.0, 5.0, 2.0, float("-inf"), float("-inf")], [float("-inf")] * 5]))
    assert_same(run_cuda(s, s, mask, 4, 5), expected, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("values", ["randn", "ties_inf"])
@pytest.mark.parametrize("batch", [1024, 3])
def test_squad_size_matches_torch_and_triton(batch, dtype, values):
    """batch 1024 (one warp per row) and 3 (four warps per row), L 384, topk 20,
    max_answer_len 30: the cuda backend equals the torch backend (and Triton) exactly."""
    s, e, mask = make_inputs(11, batch, 384, values, "passage", dtype)
    with use_backend("torch"):
        ref = tuple(t.cpu() for t in span_score(s, e, mask, 30, 20))
    out = run_cuda(s, e, mask, 30, 20)
    assert_same(out, ref, f"gpu cuda {dtype} {values}")
    with use_backend("cuda"):
        assert_same(span_score(s, e, None, 30, 20), tuple(t.cpu() for t in span_score_ref(s, e, None, 30, 20)),
                    "gpu span_score cuda without mask")
    pytest.importorskip("triton")
    with use_backend("triton"):
        assert_same(span_score(s, e, mask, 30, 20), ref, "gpu triton")
    rows = [0, 1, batch - 1]
    assert_same(tuple(t[rows] for t in out), brute_force(s[rows], e[rows], mask[rows], 30, 20), "gpu brute force")


@pytest.mark.parametrize("B", [3, 4])
def test_rising_scores_worst_case(cuda_device, B):
    """Scores rising with position: every tile inserts keys (the slowest path); B = 3: four
    warps per row in the emulation, whose lists then merge."""
    L = 512 if cuda_device.type == "cuda" else 96  # the emulation pays per warp collective
    s = torch.linspace(0, 1, L, device=cuda_device).repeat(B, 1)
    e = torch.linspace(0, 2, L, device=cuda_device).repeat(B, 1)
    with use_backend("torch"):
        ref = tuple(t.cpu() for t in span_score(s, e, None, 64, 32))
    assert_same(run_cuda(s, e, None, 64, 32), ref, "cuda rising")


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    import fastbert.ops.span as span_mod

    s, e, mask = make_inputs(5, 64, 384, "randn", "passage")
    expected = tuple(t.cpu() for t in span_score_ref(s, e, mask, 30, 20))
    compiled = torch.compile(span_mod._cuda_span_score, fullgraph=True, dynamic=False)
    assert_same(compiled(s, e, mask, 30, 20), expected, "compiled cuda")
    op = torch.compile(lambda a, b, m: torch.ops.fastbert.span_score_cuda(a, b, m, 30, 20), fullgraph=True)
    assert_same(op(s, e, mask), expected, "compiled registered op")


# ----------------------------------------------------------------------------- without a GPU

@pytest.mark.skipif(ON_GPU, reason="checks the refusal of CPU tensors")
def test_cuda_path_refuses_cpu_tensors(monkeypatch):
    import fastbert.ops.span as span_mod

    monkeypatch.setattr(span_mod, "resolve", lambda cuda_device: "cuda")
    with pytest.raises(ValueError, match="span_score: the cuda backend needs CUDA tensors, start_logits is on cpu"):
        span_score(torch.zeros(1, 4), torch.zeros(1, 4))

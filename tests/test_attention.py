"""Flash attention (Triton): forward, dq/dk/dv, varlen, dropout, bad inputs.

Every kernel result is compared with the float64 reference `attention_ref`
under the rule max|ours - ref64| <= 2 * max|baseline - ref64| + floor, where
the baseline is the same reference run in the test dtype. Launcher outputs are
poisoned (NaN) before the kernels run, so an unwritten element fails.
"""
import importlib
import math

import pytest
import torch

from attention_cases import (assert_residual_sharpens_delta, check_compiled_fullgraph, check_out_residual, key_mask,
                             pack, philox7, qkv, ref_with_grads)
from conftest import DEVICE, FLOOR, KERNEL_DTYPES, ON_GPU, assert_close_to_ref, poison

from fastbert.kernels.attention import attention_bwd, attention_dropout_mask, attention_fwd
from fastbert.ops import use_backend
from fastbert.ops.attention import attention, attention_ref, attention_varlen, attention_varlen_ref

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _triton_poisoned(q, k, v, do, mask, dropout_p, scale, seed, residual=None):
    """(out, lse, dq, dk, dv) from the launchers, every output NaN-filled before the kernels write it.

    residual: pass out's rounding residual from the forward to the backward (the default for
    float16/bfloat16, as AttentionFunction does when training), or not (FlashAttention-2's D_i).
    """
    B, S, H, _ = q.shape
    if residual is None:
        residual = q.dtype != torch.float32
    out = poison(torch.empty_like(q))
    out_residual = poison(torch.empty_like(q)) if residual else None
    lse = poison(torch.empty((B, H, S), dtype=torch.float32, device=q.device))
    attention_fwd(q, k, v, mask, None, None, dropout_p, scale, seed, out=out, lse=lse, out_residual=out_residual)
    if residual:
        check_out_residual(out, out_residual)
    dq, dk, dv = (poison(torch.empty_like(t)) for t in (q, k, v))
    attention_bwd(do, q, k, v, out, lse, mask, None, None, dropout_p, scale, seed, dq=dq, dk=dk, dv=dv,
                  out_residual=out_residual)
    return out, lse, dq, dk, dv


def _check_all(q, k, v, mask, dropout_p=0.0, scale=None, seed=0):
    """Kernels vs the float64 reference (same dropout mask), forward and every gradient."""
    dtype = q.dtype
    gen = torch.Generator().manual_seed(1234)
    do = torch.randn(q.shape, dtype=torch.float64, generator=gen).to(device=q.device, dtype=dtype)
    keep = None
    if dropout_p > 0.0:
        B, S, H, _ = q.shape
        keep = attention_dropout_mask(B, H, S, dropout_p, seed, q.device)
    out, lse, dq, dk, dv = _triton_poisoned(q, k, v, do, mask, dropout_p, scale, seed)
    ref = ref_with_grads(q, k, v, do, mask, dropout_p, scale, keep, torch.float64)
    base = ref_with_grads(q, k, v, do, mask, dropout_p, scale, keep, dtype)
    for name, ours, r, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, base):
        assert_close_to_ref(ours, r, b, name)
    # logsumexp against torch's, on rows with at least one real key (others store +inf)
    s = math.sqrt(q.shape[-1]) if scale is None else 1.0 / scale
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / s
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse_ref = torch.logsumexp(scores, dim=-1)                    # (B, H, S)
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse.double()[finite], lse_ref[finite], rtol=0, atol=1e-4 * lse_ref.abs().max().item() + 1e-5)
    assert torch.all(lse[~finite] == float("inf"))
    return out, dq, dk, dv


# ---------------------------------------------------------------------------
# Forward and backward vs the float64 reference
# ---------------------------------------------------------------------------

CASES = [
    # (batch, seqlen, heads, head_dim, dtype, mask kind)
    (1, 1, 1, 32, torch.float32, None),          # seqlen 1
    (2, 7, 2, 64, torch.float16, "lengths"),     # shorter than one block
    (2, 129, 2, 64, torch.float32, "random"),    # one past a block edge, holes, an empty row
    (3, 129, 2, 64, torch.float16, "lengths"),   # mixed lengths
    (1, 512, 1, 64, torch.float16, None),        # BERT's longest, every block full
    (2, 96, 2, 32, torch.float16, "random"),     # block-aligned with a mask
    (2, 33, 2, 128, torch.float32, "random"),    # largest head dim
    (2, 40, 2, 128, torch.float16, None),
    (2, 37, 3, 48, torch.float32, "lengths"),    # head dim padded to 64
    (1, 50, 2, 80, torch.float16, "random"),     # head dim padded to 128
    (2, 64, 2, 16, torch.float32, None),         # smallest head dim
]


@pytest.mark.parametrize("B,S,H,D,dtype,mask_kind", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{str(c[4])[6:]}-{c[5]}" for c in CASES])
def test_forward_backward(B, S, H, D, dtype, mask_kind):
    gen = torch.Generator().manual_seed(B * 1000 + S * 10 + D)
    q, k, v = qkv((B, S, H, D), dtype, gen)
    mask = key_mask(mask_kind, B, S, gen)
    _check_all(q, k, v, mask)


@pytest.mark.skipif(ON_GPU, reason="runs the GPU tiles of a 99 KB GPU through the interpreter")
@pytest.mark.parametrize("D, dropout_p", [(128, 0.0), (96, 0.2)])
def test_the_tiles_for_gpus_with_99_kb_of_shared_memory(monkeypatch, D, dropout_p):
    """sm_86/sm_89/sm_120 (RTX 30/40/50, A10, L4) give a program 99 KB of shared memory, which the
    half-precision tiles past head_dim 64 overran (Triton refused them at launch; tests/triton_aot.py
    --arch 89 checks the size). Their smaller tiles, never run before, against float64 here."""
    import fastbert.kernels.attention as KA

    pick = {"fwd": KA._fwd_config, "bwd_dq": KA._bwd_dq_config, "bwd": KA._bwd_config}
    with monkeypatch.context() as m:
        m.setattr(KA, "_interpreting", lambda: False)
        small = {name: f(D, torch.float16, 101376) for name, f in pick.items()}
        big = {name: f(D, torch.float16, 166912) for name, f in pick.items()}
        assert all(small[name] != big[name] for name in pick)
        assert {name: f(64, torch.float16, 101376) for name, f in pick.items()} == \
               {name: f(64, torch.float16, None) for name, f in pick.items()}   # head_dim <= 64: unchanged
    monkeypatch.setattr(KA, "CONFIG_OVERRIDE", small)
    gen = torch.Generator().manual_seed(D)
    q, k, v = qkv((2, 75, 1, D), torch.float16, gen)   # 75: not a multiple of 32 or 64
    _check_all(q, k, v, key_mask("lengths", 2, 75, gen), dropout_p=dropout_p, seed=9)


def test_trailing_padding_across_blocks():
    """Rows padded past whole key blocks (the key loops stop at the last real key, a block of
    padding keys skips its dK/dV loop), a fully padded row, with dropout: against float64."""
    gen = torch.Generator().manual_seed(151)
    q, k, v = qkv((4, 150, 1, 32), torch.float16, gen)
    mask = (torch.arange(150)[None, :] < torch.tensor([150, 40, 70, 0])[:, None]).to(DEVICE)
    _check_all(q, k, v, mask, dropout_p=0.2, seed=5)


def test_left_padding():
    """Left-padded rows (the real keys at the end): the forward and dQ key loops run to the row's
    end, and a key block whose only real key is its last (key 127 of row 1, key 63 of row 2,
    for any power-of-two block up to 64) still gets its dK and dV."""
    gen = torch.Generator().manual_seed(29)
    q, k, v = qkv((4, 130, 1, 32), torch.float16, gen)
    mask = (torch.arange(130)[None, :] >= torch.tensor([0, 127, 63, 129])[:, None]).to(DEVICE)
    _check_all(q, k, v, mask)


def test_custom_scale_and_strided_inputs():
    """softmax_scale is honoured; q, k, v as views of one fused (B, S, H, 3, D) projection (no copy)."""
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn((2, 45, 2, 3, 32), dtype=torch.float64, generator=gen).to(device=DEVICE, dtype=torch.float32)
    q, k, v = qkv.unbind(dim=3)                          # each (B, S, H, D), strides of the fused tensor
    assert not q.is_contiguous()
    _check_all(q, k, v, key_mask("lengths", 2, 45, gen), scale=0.3)


def test_fully_masked_rows_are_zero():
    """A sequence whose keys are all masked: zero output, zero gradients, no NaN, lse = +inf."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv((2, 21, 2, 32), torch.float32, gen)
    mask = torch.ones(2, 21, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    out, lse, dq, dk, dv = _triton_poisoned(q, k, v, do, mask, 0.0, None, 0)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), name
        assert torch.all(t[1] == 0), name
    assert torch.all(lse[1] == float("inf"))
    # the public path (autograd Function) agrees
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend("triton"):
        out2 = attention(*leaves, mask=mask)
    out2.backward(do)
    assert torch.equal(out2.detach(), out)
    for ours, leaf in zip((dq, dk, dv), leaves):
        assert torch.equal(leaf.grad, ours)


def test_public_function_matches_launchers():
    """attention() on the Triton backend runs the same kernels through AttentionFunction."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = qkv((2, 30, 2, 64), torch.float16, gen)
    mask = key_mask("random", 2, 30, gen)
    do = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=q.dtype)
    out, _, dq, dk, dv = _triton_poisoned(q, k, v, do, mask, 0.2, 0.11, 99)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend("triton"):
        out2 = attention(*leaves, mask=mask, dropout_p=0.2, softmax_scale=0.11, seed=99)
    out2.backward(do)
    assert torch.equal(out2.detach(), out)
    for ours, leaf in zip((dq, dk, dv), leaves):
        assert torch.equal(leaf.grad, ours)


def test_gradient_with_a_non_unit_last_stride():
    """The upstream gradient may come with any layout (here its head_dim has stride H, as from a
    transpose after attention): the Function hands the kernels one with a unit last stride."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = qkv((1, 8, 2, 32), torch.float16, gen)
    do = torch.randn(1, 8, 32, 2, generator=gen).to(device=DEVICE, dtype=q.dtype).transpose(-1, -2)
    assert do.stride(-1) != 1
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend("triton"):
        attention(*leaves).backward(do)
    ref = ref_with_grads(q, k, v, do, None, 0.0, None, None, torch.float64)
    base = ref_with_grads(q, k, v, do, None, 0.0, None, None, q.dtype)
    for name, leaf, r, b in zip(("dq", "dk", "dv"), leaves, ref[1:], base[1:]):
        assert_close_to_ref(leaf.grad, r, b, name)


def _laid_out(x, order):
    """x's values in a tensor of x's shape whose memory runs in dimension order `order`."""
    return x.permute(order).contiguous().permute([order.index(i) for i in range(x.dim())])


def test_each_operand_with_its_own_strides():
    """q, k, v, do and the preallocated out, dq, dk, dv each laid out differently: a stride
    passed for the wrong tensor (v read with k's, dk written with dv's) shows. Elsewhere
    k and v, dk and dv always share one layout, so such a swap cannot fail there."""
    gen = torch.Generator().manual_seed(47)
    B, S, H, D = 2, 37, 2, 32
    q, k, v, do = qkv((B, S, H, D), torch.float32, gen) + [qkv((B, S, H, D), torch.float32, gen)[0]]
    q, k, v, do = (_laid_out(t, o) for t, o in zip((q, k, v, do), ([0, 1, 2, 3], [1, 0, 2, 3], [0, 2, 1, 3],
                                                                   [2, 0, 1, 3])))
    # The key mask is every other byte of a wider one: row 0 with holes (random bytes between), row
    # 1 left-padded past S / 2 (zeros between), so a mask read with a unit stride sees other keys,
    # and a last-key scan (the key loops' end) that ignores the stride finds no real key in row 1.
    wide = torch.rand(B, 2 * S, generator=gen) > 0.4
    wide[0, 0] = True
    wide[1] = False
    wide[1, ::2] = torch.arange(S) >= 25
    mask = wide[:, ::2].to(DEVICE)
    assert mask.stride() == (2 * S, 2)
    out, dq, dk, dv = (poison(_laid_out(torch.empty_like(q, memory_format=torch.contiguous_format), o))
                       for o in ([2, 0, 1, 3], [1, 0, 2, 3], [0, 2, 1, 3], [0, 1, 2, 3]))
    strides = [t.stride() for t in (q, k, v, do)] + [t.stride() for t in (out, dq, dk, dv)]
    assert len(set(strides[:4])) == 4 and len(set(strides[4:])) == 4
    lse = poison(torch.empty((B, H, S), dtype=torch.float32, device=DEVICE))
    attention_fwd(q, k, v, mask, None, None, 0.0, None, 0, out=out, lse=lse)
    attention_bwd(do, q, k, v, out, lse, mask, None, None, 0.0, None, 0, dq=dq, dk=dk, dv=dv)
    ref = ref_with_grads(q, k, v, do, mask, 0.0, None, None, torch.float64)
    base = ref_with_grads(q, k, v, do, mask, 0.0, None, None, torch.float32)
    for name, ours, r, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, base):
        assert_close_to_ref(ours, r, b, name)


@pytest.mark.parametrize("residual", [False, True])
def test_backward_keeps_delta_in_fp32(residual):
    """D_i = dO_i . O_i summed and kept in fp32, with or without out's residual. With a common
    offset in v and dO, D_i is large (~2000) and dS_ij = p_ij (dP_ij - D_i) a cancellation; D_i
    rounded to float16 would shift every dS_ij of its row alike, and dq would land ~2x past the
    allowance (now ~0.3x of it). The small k offset makes sum_j p_ij k_j, which that shift
    multiplies, large."""
    gen = torch.Generator().manual_seed(2)
    B, S, H, D = 2, 64, 1, 64
    q, k, v, do = (torch.randn((B, S, H, D), dtype=torch.float64, generator=gen) + offset
                   for offset in (0.0, 2.0, 30.0, 2.0))
    q, k, v, do = (t.to(device=DEVICE, dtype=torch.float16) for t in (q, k, v, do))
    out, _, dq, dk, dv = _triton_poisoned(q, k, v, do, None, 0.0, None, 0, residual=residual)
    ref = ref_with_grads(q, k, v, do, None, 0.0, None, None, torch.float64)
    base = ref_with_grads(q, k, v, do, None, 0.0, None, None, torch.float16)
    for name, ours, r, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, base):
        assert_close_to_ref(ours, r, b, name)


def test_backward_takes_delta_from_the_residual():
    """attention_cases.assert_residual_sharpens_delta on the Triton launchers."""
    assert_residual_sharpens_delta(
        lambda q, k, v, do, residual: _triton_poisoned(q, k, v, do, None, 0.0, None, 0, residual=residual)[2:4])


# ---------------------------------------------------------------------------
# Varlen
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,dropout_p", [(torch.float32, 0.0), (torch.float16, 0.25)])
def test_varlen_matches_padded(dtype, dropout_p):
    """attention_varlen on packed tokens == attention on the same sequences padded, forward and backward."""
    gen = torch.Generator().manual_seed(5)
    lens = [5, 0, 40, 17, 1]
    B, S, H, D = len(lens), max(lens), 2, 32
    q, k, v = qkv((B, S, H, D), dtype, gen)
    mask = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).to(DEVICE)
    do = torch.randn((B, S, H, D), generator=gen).to(device=DEVICE, dtype=dtype)
    do = do * mask[:, :, None, None]                      # padded query rows carry no gradient
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)

    padded = [t.clone().requires_grad_() for t in (q, k, v)]
    packed = [pack(t, lens).requires_grad_() for t in (q, k, v)]
    with use_backend("triton"):
        out_p = attention(*padded, mask=mask, dropout_p=dropout_p, seed=21)
        out_v = attention_varlen(*packed, cu, S, dropout_p=dropout_p, seed=21)
    out_p.backward(do)
    out_v.backward(pack(do, lens))
    # same kernels, same mask, same per-sequence arithmetic: equal up to summation order
    tol = dict(rtol=0, atol=FLOOR[dtype])
    torch.testing.assert_close(out_v, pack(out_p, lens), **tol)
    for tp, tv in zip(padded, packed):
        torch.testing.assert_close(tv.grad, pack(tp.grad, lens), **tol)

    # and against the float64 varlen reference with the kernels' dropout mask
    keep = attention_dropout_mask(B, H, S, dropout_p, 21, DEVICE) if dropout_p > 0 else None
    leaves64 = [t.detach().double().requires_grad_() for t in packed]
    leaves_lo = [t.detach().clone().requires_grad_() for t in packed]
    ref = attention_varlen_ref(*leaves64, cu, dropout_p, None, keep)
    base = attention_varlen_ref(*leaves_lo, cu, dropout_p, None, keep)
    g_ref = torch.autograd.grad(ref, leaves64, pack(do, lens).double())
    g_base = torch.autograd.grad(base, leaves_lo, pack(do, lens))
    assert_close_to_ref(out_v.detach(), ref, base, "varlen out")
    for name, leaf, r, b in zip(("dq", "dk", "dv"), packed, g_ref, g_base):
        assert_close_to_ref(leaf.grad, r, b, f"varlen {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_poisoned_outputs(dtype):
    """Every packed row and lse entry is written (NaN-filled buffers, odd lengths); in float16
    out's residual too."""
    gen = torch.Generator().manual_seed(8)
    lens = [3, 33, 18]
    T, H, D = sum(lens), 2, 64
    q, k, v = qkv((T, H, D), dtype, gen)
    cu = torch.tensor([0, 3, 36, 54], dtype=torch.int32, device=DEVICE)
    out, lse = poison(torch.empty_like(q)), poison(torch.empty((H, T), dtype=torch.float32, device=DEVICE))
    out_residual = poison(torch.empty_like(q)) if dtype != torch.float32 else None
    attention_fwd(q, k, v, None, cu, max(lens), 0.0, None, 0, out=out, lse=lse, out_residual=out_residual)
    if out_residual is not None:
        check_out_residual(out, out_residual)
    do = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=dtype)
    dq, dk, dv = (poison(torch.empty_like(t)) for t in (q, k, v))
    attention_bwd(do, q, k, v, out, lse, None, cu, max(lens), 0.0, None, 0, dq=dq, dk=dk, dv=dv,
                  out_residual=out_residual)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    leaves_lo = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, base = attention_varlen_ref(*leaves64, cu), attention_varlen_ref(*leaves_lo, cu)
    assert_close_to_ref(out, ref, base, "out")
    assert not torch.isnan(lse).any()
    for name, ours, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv),
                                torch.autograd.grad(ref, leaves64, do.double()),
                                torch.autograd.grad(base, leaves_lo, do)):
        assert_close_to_ref(ours, r, b, name)


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_with_same_mask(dtype):
    gen = torch.Generator().manual_seed(17)
    q, k, v = qkv((2, 70, 2, 64), dtype, gen)
    _check_all(q, k, v, key_mask("random", 2, 70, gen), dropout_p=0.3, seed=1234567)


def test_dropout_reproducible():
    gen = torch.Generator().manual_seed(19)
    q, k, v = qkv((1, 40, 2, 32), torch.float32, gen)
    with use_backend("triton"):
        a = attention(q, k, v, dropout_p=0.5, seed=5)
        b = attention(q, k, v, dropout_p=0.5, seed=5)
        c = attention(q, k, v, dropout_p=0.5, seed=6)
        torch.manual_seed(0)
        d = attention(q, k, v, dropout_p=0.5)           # seed drawn from torch's generator
        torch.manual_seed(0)
        e = attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(d, e)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(p):
    """Kept fraction within 5 sigma of 1 - p overall and for each of the four words of a Philox call."""
    B, H, S = 2, 3, 128
    keep = attention_dropout_mask(B, H, S, p, 2024, DEVICE).cpu()
    for part in [keep] + [keep[..., r::4] for r in range(4)]:
        n = part.numel()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(part.sum().item() - n * (1 - p)) < 5 * sigma, (part.float().mean().item(), 1 - p)
    # different (batch, head) draw different masks
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


def test_dropout_keeps_at_the_threshold():
    """A probability whose Philox word >> 1 equals the threshold round(p 2^31) is kept (the module
    docstring's rule; the forward, both backward kernels and attention_dropout_mask share
    _dropout_keep). p is set to each key's word of one Philox call in turn (keys 0..3 of query 3
    draw words w0, w2, w1, w3, as in csrc/attention.cuh), so random draws need not hit it (2^-31)."""
    seed, i, S = 77, 3, 8
    w0, w1, w2, w3 = philox7(seed, 0, i, 0, 0)
    gen = torch.Generator().manual_seed(31)
    q, k, v = qkv((1, S, 1, 32), torch.float32, gen)
    for j, word in enumerate((w0, w2, w1, w3)):
        p = (word >> 1) / 2.0**31
        keep = attention_dropout_mask(1, 1, S, p, seed, DEVICE)
        assert keep[0, 0, i, j], f"key {j}: word >> 1 == threshold must be kept"
        assert not keep.all(), "p must drop something"
        _check_all(q, k, v, None, dropout_p=p, seed=seed)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def test_the_residual_is_kept_only_for_a_16_bit_gradient(monkeypatch):
    """attention() asks the forward for out's residual exactly when the backward will use it: a
    gradient will be taken (grad mode on, an input requiring grad) of a float16/bfloat16 output.
    Inference and float32 write and keep nothing more than FlashAttention-2 does."""
    import fastbert.kernels.attention as KA
    seen = []
    real = KA.attention_fwd
    monkeypatch.setattr(KA, "attention_fwd", lambda *a, out_residual=None, **kw: seen.append(
        out_residual is not None) or real(*a, out_residual=out_residual, **kw))
    A = importlib.import_module("fastbert.ops.attention")  # the module (fastbert.ops exports the function)
    monkeypatch.setitem(A._LAUNCHERS, "triton", A._eager_launchers(KA.attention_fwd, KA.attention_bwd))
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv((1, 8, 1, 32), torch.float16, gen)
    cases = [((q, k, v), True, True), ((q, k, v), False, False), ((q.float(), k.float(), v.float()), True, False)]
    with use_backend("triton"):
        for (tq, tk, tv), grad, expected in cases:
            leaves = [t.clone().requires_grad_(grad) for t in (tq, tk, tv)]
            attention(*leaves)
            with torch.no_grad():
                attention(*leaves)
            assert seen == [expected, False], (tq.dtype, grad, seen)
            seen.clear()
        leaves = [q.clone(), k.clone(), v.clone().requires_grad_(True)]  # only dv: P^T dO needs no D_i
        attention(*leaves)
        assert seen == [False]
        seen.clear()
        leaves = [q.clone(), k.clone().requires_grad_(True), v.clone()]  # only dk (frozen q): dk reads D_i
        attention(*leaves)
        assert seen == [True], "a gradient of k alone must keep out's residual"


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_backward_reads_the_residual_of_its_own_rows(layout):
    """Where each row's residual is read: with out_residual = out itself, out + residual = 2 out
    exactly in fp32, so the backward must equal the one given 2 out and no residual, bit for bit,
    on several heads, a mask and dropout, or packed sequences. A residual read at another head's
    or sequence's offset moves D_i by a whole output there, not half an ulp."""
    gen = torch.Generator().manual_seed(12)
    lens = [5, 33, 18]
    shape = (2, 37, 3, 32) if layout == "padded" else (sum(lens), 3, 32)
    q, k, v, do = qkv(shape, torch.float16, gen) + qkv(shape, torch.float16, gen)[:1]
    if layout == "padded":
        mask, cu, max_seqlen, dropout_p = key_mask("lengths", 2, 37, gen), None, None, 0.2
    else:
        mask, max_seqlen, dropout_p = None, max(lens), 0.0
        cu = torch.tensor([0, 5, 38, 56], dtype=torch.int32, device=DEVICE)
    out, lse = attention_fwd(q, k, v, mask, cu, max_seqlen, dropout_p, None, 7)
    doubled = attention_bwd(do, q, k, v, 2 * out, lse, mask, cu, max_seqlen, dropout_p, None, 7)
    residual = attention_bwd(do, q, k, v, out, lse, mask, cu, max_seqlen, dropout_p, None, 7, out_residual=out.clone())
    plain = attention_bwd(do, q, k, v, out, lse, mask, cu, max_seqlen, dropout_p, None, 7)
    for name, a, b, c in zip(("dq", "dk", "dv"), residual, doubled, plain):
        assert torch.equal(a, b), f"{name}: the residual was not read where out was"
        if name != "dv":  # the check can fail: D_i from 2 out is not D_i from out
            assert not torch.equal(a, c), name


def test_out_residual_must_be_laid_out_like_out():
    """The kernels step out's residual with out's strides: anything else is refused by name."""
    q = _t(2, 8, 2, 32, dtype=torch.float16)
    out, lse = attention_fwd(q, q, q)
    for bad in (torch.empty_like(out, dtype=torch.float32), torch.empty(2, 8, 2, 16, dtype=torch.float16),
                torch.empty(2, 2, 8, 32, dtype=torch.float16).transpose(1, 2)):
        with pytest.raises(ValueError, match="out_residual must have out's shape .* and strides"):
            attention_fwd(q, q, q, out_residual=bad.to(DEVICE))
        with pytest.raises(ValueError, match="out_residual must have out's shape .* and strides"):
            attention_bwd(q, q, q, q, out, lse, out_residual=bad.to(DEVICE))


def test_bad_inputs():
    q = _t(2, 8, 2, 32)
    with use_backend("triton"):
        with pytest.raises(ValueError, match="head_dim = 40 is not supported by the Triton backend.*32, 48"):
            attention(_t(2, 8, 2, 40), _t(2, 8, 2, 40), _t(2, 8, 2, 40))
        with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
            qt = _t(2, 8, 2, 32).transpose(2, 3).contiguous().transpose(2, 3)
            attention(qt, q, q)
        with pytest.raises(TypeError, match="takes float16, bfloat16 or float32, got torch.float64"):
            attention(q.double(), q.double(), q.double())
        with pytest.raises(ValueError, match="must share one shape"):
            attention(q, _t(2, 9, 2, 32), q)
        with pytest.raises(TypeError, match="must share one dtype"):
            attention(q, q.half(), q)
        with pytest.raises(TypeError, match="mask must be torch.bool"):
            attention(q, q, q, mask=torch.ones(2, 8, device=DEVICE))
        with pytest.raises(ValueError, match=r"mask must be \(batch, seqlen\)"):
            attention(q, q, q, mask=torch.ones(2, 9, dtype=torch.bool, device=DEVICE))
        with pytest.raises(ValueError, match="mask is on meta but q is on"):  # meta: a second device
            attention(q, q, q, mask=torch.ones(2, 8, dtype=torch.bool, device="meta"))
        with pytest.raises(ValueError, match="dropout_p must be in"):
            attention(q, q, q, dropout_p=1.0)
        with pytest.raises(ValueError, match=r"must be \(batch, seqlen, heads, head_dim\)"):
            attention(_t(8, 2, 32), _t(8, 2, 32), _t(8, 2, 32))
        if not ON_GPU:
            with pytest.raises(TypeError, match="bfloat16 is not supported by the Triton interpreter"):
                qb = q.bfloat16()
                attention(qb, qb, qb)


def test_bad_varlen_inputs():
    p = _t(10, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with use_backend("triton"):
        with pytest.raises(TypeError, match="cu_seqlens must be torch.int32, got torch.int64"):
            attention_varlen(p, p, p, cu.long(), 6)
        with pytest.raises(ValueError, match=r"cu_seqlens must be \(batch \+ 1,\)"):
            attention_varlen(p, p, p, cu[None], 6)
        with pytest.raises(ValueError, match=r"cu_seqlens must be \(batch \+ 1,\)"):
            attention_varlen(p, p, p, cu[:1], 6)
        with pytest.raises(ValueError, match=r"must be \(total_tokens, heads, head_dim\)"):
            attention_varlen(p[None], p[None], p[None], cu, 6)
        with pytest.raises(ValueError, match="max_seqlen must be an int"):
            attention_varlen(p, p, p, cu, 6.0)
        if DEVICE.type == "cpu":  # offsets are only checked where that costs no device sync
            with pytest.raises(ValueError, match="max_seqlen = 5 is below the longest sequence"):
                attention_varlen(p, p, p, cu, 5)
            with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to total_tokens = 10"):
                attention_varlen(p, p, p, torch.tensor([0, 4, 9], dtype=torch.int32), 6)
            with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to total_tokens = 10"):
                attention_varlen(p, p, p, torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6)  # a negative length
        with pytest.raises(ValueError, match="head_dim = 24 is not supported"):
            attention_varlen(_t(10, 2, 24), _t(10, 2, 24), _t(10, 2, 24), cu, 6)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's refusal")
@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False), ("3.9.0+git1", "2.4.6", False)])
def test_interpreter_numpy_incompatibility_is_a_clear_error(monkeypatch, triton_version, numpy_version, refused):
    """Triton 3.6's interpreter cannot run with numpy 2.4 (seen: every kernel with a runtime
    loop bound fails deep inside the interpreter); that must be one clear error up front."""
    from fastbert.ops import _backend

    monkeypatch.setattr(_backend, "_installed_versions", lambda: (triton_version, numpy_version))
    _backend.interpreter_problem.cache_clear()
    try:
        q = torch.randn(1, 4, 1, 32)
        with use_backend("triton"):
            if refused:
                with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0 interpreter .* numpy 2\.4\.1: install numpy<2\.4"):
                    attention(q, q, q)
            else:
                torch.testing.assert_close(attention(q, q, q), attention_ref(q, q, q), rtol=1e-5, atol=1e-5)
    finally:
        _backend.interpreter_problem.cache_clear()


def test_cpu_tensor_on_triton_without_interpreter(monkeypatch):
    from fastbert.kernels import gelu as triton_gelu

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_gelu, "BUILT_FOR_INTERPRETER", False)  # what triton.jit built them as decides
    q = torch.randn(1, 4, 1, 32)
    with use_backend("triton"), pytest.raises(RuntimeError, match="cannot run on a cpu tensor"):
        attention(q, q, q)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_keys_never_contribute_whatever_their_score(backend):
    """A masked key is out of the softmax however large its score: here it beats the real keys
    by about 4e4, so a finite "large negative" bias such as -1e4 would let it take the row."""
    q = torch.full((1, 4, 1, 16), 10.0, device=DEVICE)
    k = torch.full((1, 4, 1, 16), 0.1, device=DEVICE)
    k[:, 3] = 1000.0                                                   # the masked key: score 4e4
    v = torch.arange(4.0, device=DEVICE)[None, :, None, None].expand(1, 4, 1, 16).contiguous()
    mask = torch.tensor([[True, True, True, False]], device=DEVICE)
    with use_backend(backend):
        out = attention(q, k, v, mask, softmax_scale=0.25)
    torch.testing.assert_close(out.double(), attention_ref(q.double(), k.double(), v.double(), mask, 0.0, 0.25))
    assert (out < 3).all()


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_torch_backend_applies_dropout(layout):
    """The torch backend drops attention probabilities too (SDPA's own mask): the output moves
    with dropout_p, and torch.manual_seed reproduces it."""
    gen = torch.Generator().manual_seed(21)
    shape = (2, 16, 2, 32) if layout == "padded" else (32, 2, 32)
    q, k, v = qkv(shape, torch.float32, gen)
    cu = torch.tensor([0, 16, 32], dtype=torch.int32, device=DEVICE)

    def run(p):
        torch.manual_seed(4)
        return attention(q, k, v, dropout_p=p) if layout == "padded" else attention_varlen(q, k, v, cu, 16, p)

    with use_backend("torch"):
        plain, dropped = run(0.0), run(0.5)
        assert torch.equal(run(0.5), dropped)
    assert not torch.allclose(plain, dropped)


def test_torch_backend_varlen_matches_reference():
    gen = torch.Generator().manual_seed(23)
    q, k, v = qkv((12, 2, 16), torch.float64, gen)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    with use_backend("torch"):
        out = attention_varlen(q, k, v, cu, 7)
    torch.testing.assert_close(out, attention_varlen_ref(q, k, v, cu))


@pytest.mark.skipif(ON_GPU, reason="the GPU compile test covers this with inductor")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16: out's residual through the ops
def test_compile_traces_without_graph_break_cpu(dtype):
    """fullgraph=True through the registered ops (Dynamo's eager backend: the interpreter cannot be captured)."""
    gen = torch.Generator().manual_seed(29)
    q, k, v = qkv((2, 20, 2, 32), dtype, gen)
    mask = key_mask("lengths", 2, 20, gen)

    def f(q, k, v, mask):
        return attention(q, k, v, mask, dropout_p=0.0)

    torch._dynamo.reset()
    with use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend="eager")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = compiled(*leaves, mask)
        out.float().sum().backward()
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        out_ref = f(*ref, mask)
        out_ref.float().sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# GPU: real sizes, bf16, torch.compile
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_bert_size(dtype, dropout_p):
    gen = torch.Generator().manual_seed(31)
    q, k, v = qkv((8, 512, 12, 64), dtype, gen)
    _check_all(q, k, v, key_mask("lengths", 8, 512, gen), dropout_p=dropout_p, seed=77)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 128, 80])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_gpu_head_dims(D, dtype):
    gen = torch.Generator().manual_seed(37)
    q, k, v = qkv((4, 384, 4, D), dtype, gen)
    _check_all(q, k, v, key_mask("random", 4, 384, gen), dropout_p=0.1, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 80])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_tiles_for_99_kb_of_shared_memory(monkeypatch, D, dtype):
    """The tiles an sm_86/sm_89/sm_120 GPU gets past head_dim 64 (they fit any GPU of 8.0+), run here
    at real sizes: never timed or run on a GPU before a lent H100/H200 runs this."""
    import fastbert.kernels.attention as KA

    small = {"fwd": KA._fwd_config(D, dtype, 101376), "bwd_dq": KA._bwd_dq_config(D, dtype, 101376),
             "bwd": KA._bwd_config(D, dtype, 101376)}
    assert small["fwd"] != KA._fwd_config(D, dtype, None)
    monkeypatch.setattr(KA, "CONFIG_OVERRIDE", small)
    gen = torch.Generator().manual_seed(41)
    q, k, v = qkv((4, 300, 4, D), dtype, gen)
    _check_all(q, k, v, key_mask("random", 4, 300, gen), dropout_p=0.1, seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_more_than_65535_batch_heads(dropout_p):
    """B * H = 4,097 x 16 = 65,552 (batch x heads) stood on grid axis y, which stops at 65,535 programs: the
    launch failed ("invalid argument"). One grid axis now; short rows keep this at a few MB."""
    gen = torch.Generator().manual_seed(43)
    q, k, v = qkv((4097, 3, 16, 16), torch.float16, gen)
    _check_all(q, k, v, key_mask("lengths", 4097, 3, gen), dropout_p=dropout_p, seed=5)


def test_launch_grid_is_one_axis_and_large_strides_are_copied_to_small_ones():
    """The grid stays within CUDA's limits (axis x: 2**31 - 1 programs; y and z stop at 65,535), and the
    kernels' 32-bit offsets inside a sequence never see a stride product past 2**31: such an input is
    made contiguous, such an output buffer refused. Shapes and strides only (meta tensors: no memory)."""
    import fastbert.kernels.attention as KA

    assert KA._grid(512, 64, 5462, 12) == (8 * 5462 * 12,)
    with pytest.raises(ValueError, match="more programs than one launch takes"):
        KA._grid(2**20, 16, 2**12, 16)
    B, S, H, D = 1369, 512, 16, 64          # a sequence-first fused qkv: row stride 3 * B * H * D
    assert KA._sequence_span(torch.empty(S, B - 1, 3, H, D, device="meta")[:, :, 0].transpose(0, 1), S) <= 2**31 - 1
    seq_first = torch.empty(S, B, 3, H, D, dtype=torch.float16, device="meta")[:, :, 0].transpose(0, 1)
    assert KA._sequence_span(seq_first, S) > 2**31 - 1 >= KA._sequence_span(seq_first.contiguous(), S)
    assert KA._with_small_offsets(seq_first, S).is_contiguous()
    small = torch.empty(2, S, H, D, device="meta")
    assert KA._with_small_offsets(small, S) is small
    with pytest.raises(ValueError, match="out's strides .* past the kernels' 32-bit offsets"):
        KA._check_small_offsets(S, out=seq_first)
    head_major = torch.empty(H, 2185, S, 128, device="meta").permute(1, 2, 0, 3)  # (B, S, H, D) view
    assert KA._sequence_span(head_major, S) > 2**31 - 1


@pytest.mark.gpu
def test_gpu_varlen_bf16():
    gen = torch.Generator().manual_seed(41)
    lens = [128, 77, 512, 3, 300]
    T, H, D = sum(lens), 12, 64
    q, k, v = qkv((T, H, D), torch.bfloat16, gen)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend("triton"):
        out = attention_varlen(*leaves, cu, max(lens))
    do = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=q.dtype)
    out.backward(do)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    leaves_lo = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, base = attention_varlen_ref(*leaves64, cu), attention_varlen_ref(*leaves_lo, cu)
    assert_close_to_ref(out.detach(), ref, base, "out")
    for name, leaf, r, b in zip(("dq", "dk", "dv"), leaves, torch.autograd.grad(ref, leaves64, do.double()),
                                torch.autograd.grad(base, leaves_lo, do)):
        assert_close_to_ref(leaf.grad, r, b, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_compile_fullgraph(dropout_p):
    check_compiled_fullgraph("triton", dropout_p)

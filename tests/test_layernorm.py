"""add_layernorm and layernorm_gelu: the Triton backend against a float64 reference.

Rule (STYLE.md habit 9): max|ours - ref64| <= 2 * max|baseline - ref64| + floor(dtype),
baseline = the same reference run in the test dtype. Forward and every gradient. Every
tensor the launchers allocate starts as NaN, so an element a kernel fails to write fails.
"""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, ON_GPU, assert_close_to_ref, guarded_allocations
from layernorm_cases import (
    check_autocast_mix, check_overflowing_squares_give_nan, compare_to_reference, layernorm_inputs, run_with_grads,
)

import fastbert.kernels.layernorm as K
from fastbert.ops import use_backend
from fastbert.ops.layernorm import (
    _draw_seed, add_layernorm, add_layernorm_ref, layernorm_gelu, layernorm_gelu_ref,
)

EPS = 1e-5

# Hidden sizes 1, 7, 384, 768, 1000, 4096; row counts 1, odd, and more rows than one
# interpreter tile (so tiles are partly padded and a backward program loops).
SHAPES = [
    (1, 1), (5, 1), (1, 7), (3, 7), (2, 3, 384), (37, 384), (1, 768), (3, 5, 768),
    (13, 1000), (2, 4096),
]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output and partial-sum buffer the launchers allocate starts poisoned and is the front
    of a longer poisoned buffer: at the end of the test the rest must be untouched (no store past the end)."""
    with guarded_allocations(monkeypatch, (K,)):
        yield


# ----------------------------------------------------------------------------- add_layernorm

@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_layernorm_matches_reference(shape, dtype):
    tensors, dy = layernorm_inputs(shape, dtype)
    compare_to_reference("triton", lambda x, r, w, b: add_layernorm(x, r, w, b, EPS),
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, EPS),
             tensors, dy, ["dx", "dresidual", "dweight", "dbias"])


def test_add_layernorm_fp32_params_with_fp16_activations():
    """Mixed precision: LayerNorm parameters stay fp32 while activations are fp16."""
    (x, r, w, b), dy = layernorm_inputs((3, 5, 768), torch.float16)
    w, b = w.float(), b.float()
    compare_to_reference("triton", lambda x, r, w, b: add_layernorm(x, r, w, b, EPS),
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, EPS),
             [x, r, w, b], dy, ["dx", "dresidual", "dweight", "dbias"])


def test_add_layernorm_non_contiguous_and_empty():
    (x, r, w, b), dy = layernorm_inputs((7, 384), torch.float32)
    xt = x.t().contiguous().t()  # same values, column-major: the op copies it to rows
    assert not xt.is_contiguous()
    with use_backend("triton"):
        assert torch.equal(add_layernorm(xt, r, w, b, EPS), add_layernorm(x, r, w, b, EPS))
        (x0, r0, w0, b0), dy0 = layernorm_inputs((0, 384), torch.float32)
        out, (dx, dr, dw, db) = run_with_grads(lambda x, r, w, b: add_layernorm(x, r, w, b, EPS), [x0, r0, w0, b0], dy0)
    assert out.shape == (0, 384) and dx.shape == (0, 384)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(3, 5, 768), (13, 1000), (2, 7)])
def test_add_layernorm_autocast_mix(shape, dropout_p, copy, monkeypatch):
    """fp16 x (bf16 on a GPU) with the fp32 residual stream, as autocast hands them over:
    the kernels read the mix as it is (no promotion pass), y/dresidual fp32, dx fp16."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    seen = []
    for name in ("add_layernorm_fwd", "add_layernorm_bwd"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, real=real, name=name, **kw: seen.append(
            (name, a[0].dtype, a[1].dtype, a[2].dtype)) or real(*a, **kw))
    out, grads = check_autocast_mix("triton", DEVICE, shape, dtype, dropout_p,
                                    keep_mask=lambda shape, seed: K.add_layernorm_keep_mask(shape, dropout_p, seed),
                                    copy=copy)
    if dropout_p == 0.0 and not copy and not ON_GPU:
        # The interpreter's fp32 sums do not depend on the input dtype: promoting x first
        # (one more pass each way) must give bitwise the same numbers.
        (x, r, w, b) = [t.detach() for t in _mix_inputs(shape)]
        with use_backend("triton"):
            y2, g2 = run_with_grads(lambda x, r, w, b: add_layernorm(x.float(), r, w, b, EPS),
                                    [x, r, w, b], layernorm_inputs(shape, torch.float32, seed=7)[1])
        assert torch.equal(out, y2)
        assert all(torch.equal(a, b) for a, b in zip(grads, g2))
    assert ("add_layernorm_fwd", dtype, torch.float32, torch.float32) in seen, seen
    assert ("add_layernorm_bwd", torch.float32, dtype, torch.float32) in seen, seen


@pytest.mark.parametrize("copy", [False, True])
def test_torch_backend_under_autocast_promotes(copy):
    """The torch backend under autocast promotes the mix first (as `x + residual` does in
    transformers): y is float32, within float32's error of the float64 reference, and the
    copy_in_x_dtype copy is y in x's (the autocast) dtype, not the promoted one."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    (x, r, w, b), _ = layernorm_inputs((4, 64), torch.float32, seed=7)
    x = x.to(dtype)
    with use_backend("torch"), torch.autocast(DEVICE.type, dtype=dtype):
        out = add_layernorm(x, r, w, b, EPS, copy_in_x_dtype=copy)
    y, y_copy = out if copy else (out, None)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = add_layernorm_ref(*(t.double() for t in (x, r, w, b)), EPS)
    assert_close_to_ref(y, ref, add_layernorm_ref(x.float(), r, w, b, EPS), "y")
    if copy:
        assert y_copy.dtype == dtype and torch.equal(y_copy, y.to(dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_weights_with_the_autocast_mix_are_taken_by_every_backend(backend):
    """x in the autocast dtype, the float32 residual stream and weights in x's dtype (a model cast to
    half, its LayerNorm run under autocast): the kernel backends took them and the torch backend refused
    them, because it checked the weights against the promoted x. Both take them now, within float32's
    error of the float64 reference (the weights are exact in either dtype)."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    (x, r, w, b), _ = layernorm_inputs((4, 64), torch.float32, seed=11)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    with use_backend(backend), torch.autocast(DEVICE.type, dtype=dtype):
        y = add_layernorm(x, r, w, b, EPS)
    assert y.dtype == torch.float32
    ref = add_layernorm_ref(*(t.double() for t in (x, r, w, b)), EPS)
    assert_close_to_ref(y, ref, add_layernorm_ref(x.float(), r, w.float(), b.float(), EPS), "y")


def test_references_normalise_half_activations_with_fp32_params_using_eps():
    """The references' mixed-precision path (float16 x, float32 weight/bias: the torch backend on a
    GPU, and the kernel tests' reference) normalises in float32 with the eps given. A large eps
    makes a dropped (default 1e-5) or misplaced eps show."""
    (x, r, w, b), _ = layernorm_inputs((5, 64), torch.float16)
    w32, b32, eps = w.float(), b.float(), 0.5
    for name, fn, args, half_args in (("add_layernorm_ref", add_layernorm_ref, (x, r, w32, b32), (x, r, w, b)),
                                      ("layernorm_gelu_ref", layernorm_gelu_ref, (x, w32, b32), (x, w, b))):
        ours = fn(*args, eps)
        assert ours.dtype == torch.float16, name
        assert_close_to_ref(ours, fn(*(t.double() for t in args), eps), fn(*half_args, eps), name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_normalises_half_cpu_rows_in_float32(dtype):
    """On the CPU the torch backend normalises float16/bfloat16 in float32, as the kernels do:
    bit for bit the float32 reference rounded to the input dtype (PyTorch's half CPU LayerNorm
    is less accurate, and its float16 backward gives NaN where eps underflows)."""
    (x, r, w, b), _ = layernorm_inputs((3, 64), dtype)
    x, r, w, b = (t.cpu() for t in (x, r, w, b))
    with use_backend("torch"):
        y, z = add_layernorm(x, r, w, b, EPS), layernorm_gelu(x, w, b, EPS)
    assert torch.equal(y, add_layernorm_ref(x.float(), r.float(), w.float(), b.float(), EPS).to(dtype))
    assert torch.equal(z, layernorm_gelu_ref(x.float(), w.float(), b.float(), EPS).to(dtype))


def _mix_inputs(shape):
    (x, r, w, b), _ = layernorm_inputs(shape, torch.float32, seed=7)
    return x.half(), r, w, b


# ----------------------------------------------------------------------------- dropout

P = 0.1


def test_dropout_same_seed_same_output():
    (x, r, w, b), _ = layernorm_inputs((3, 5, 768), torch.float32)
    with use_backend("triton"):
        torch.manual_seed(1)
        y1 = add_layernorm(x, r, w, b, EPS, dropout_p=P)
        torch.manual_seed(1)
        y2 = add_layernorm(x, r, w, b, EPS, dropout_p=P)
        y3 = add_layernorm(x, r, w, b, EPS, dropout_p=P)
        y0 = add_layernorm(x, r, w, b, EPS)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3)
    assert not torch.equal(y1, y0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(p):
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    keep = K.add_layernorm_keep_mask((2, 32, 1000), p, seed)
    assert keep.dtype == torch.int8 and keep.shape == (2, 32, 1000)
    assert ((keep == 0) | (keep == 1)).all(), "keep-mask element not written"
    n = keep.numel()
    kept = keep.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sigma, f"kept {kept:.4f}, expected {1 - p} +- {6 * sigma:.4f}"
    rows = keep.view(-1, 1000)
    assert not torch.equal(rows[0], rows[1]), "rows share one mask: offsets ignore the row"
    other = K.add_layernorm_keep_mask((2, 32, 1000), p, seed + 1)
    assert not torch.equal(keep, other), "the seed does not change the mask"


@pytest.mark.parametrize("n", [7, 16, 1000])
def test_dropout_mask_packed_equals_per_element(n):
    """The kernels draw 4 uniforms per Philox call and interleave them; the per-element path
    computes each element's uniform from its own definition: the masks must be equal."""
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    packed = K.add_layernorm_keep_mask((5, n), 0.5, seed, packed=True)
    single = K.add_layernorm_keep_mask((5, n), 0.5, seed, packed=False)
    assert torch.equal(packed, single)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 768), (13, 1000), (2, 7)])
def test_dropout_matches_reference_with_same_mask(shape, dtype):
    tensors, dy = layernorm_inputs(shape, dtype, seed=3)

    def ours(x, r, w, b):
        torch.manual_seed(5)  # the Function's first draw is its seed
        return add_layernorm(x, r, w, b, EPS, dropout_p=P)

    torch.manual_seed(5)
    keep = K.add_layernorm_keep_mask(shape, P, _draw_seed(DEVICE)).bool()
    assert 0 < keep.sum() < keep.numel()
    compare_to_reference("triton", ours,
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, EPS, P, dropout_mask=keep.to(x.dtype)),
             tensors, dy, ["dx", "dresidual", "dweight", "dbias"])


# ----------------------------------------------------------------------------- layernorm_gelu

@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_gelu_matches_reference(shape, dtype):
    tensors, dy = layernorm_inputs(shape, dtype, with_residual=False)
    compare_to_reference("triton", lambda x, w, b: layernorm_gelu(x, w, b, EPS),
             lambda x, w, b: layernorm_gelu_ref(x, w, b, EPS),
             tensors, dy, ["dx", "dweight", "dbias"])


# ----------------------------------------------------------------------------- bad input

def test_rows_of_overflowing_squares_give_nan_as_torch_does():
    check_overflowing_squares_give_nan("triton", DEVICE)


def test_badlayernorm_inputs():
    (x, r, w, b), _ = layernorm_inputs((3, 8), torch.float32)
    with use_backend("triton"):
        with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
            add_layernorm(x, r, w[:7], b, EPS)
        with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
            layernorm_gelu(x, w, b[None], EPS)
        with pytest.raises(ValueError, match="residual must have x's shape"):
            add_layernorm(x, r[:2], w, b, EPS)
        with pytest.raises(TypeError, match="residual must have x's dtype"):
            add_layernorm(x, r.half(), w, b, EPS)
        with pytest.raises(TypeError, match="weight must have x's dtype"):
            layernorm_gelu(x, w.half(), b.half(), EPS)
        with pytest.raises(TypeError, match="weight and bias must share a dtype"):
            layernorm_gelu(x.half(), w.half(), b, EPS)
        with pytest.raises(ValueError, match="weight is on meta"):
            add_layernorm(x, r, w.to("meta"), b, EPS)
        with pytest.raises(TypeError, match="x must be a floating-point"):
            layernorm_gelu(x.long(), w, b, EPS)
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            add_layernorm(x, r, w, b, EPS, dropout_p=1.0)
        wide = torch.randn(2, 4097, device=DEVICE)
        wb = torch.randn(4097, device=DEVICE)
        with pytest.raises(ValueError, match=r"hidden sizes 1\.\.4096.*got 4097"):
            add_layernorm(wide, wide, wb, wb, EPS)
        with pytest.raises(ValueError, match=r"hidden sizes 1\.\.4096.*got 4097"):
            layernorm_gelu(wide, wb, wb, EPS)
        with pytest.raises(TypeError, match="the triton backend takes float32, float16 or bfloat16"):
            layernorm_gelu(x.double(), w.double(), b.double(), EPS)
        if not ON_GPU:
            with pytest.raises(TypeError, match="bfloat16 is not supported by the Triton interpreter"):
                layernorm_gelu(x.bfloat16(), w.bfloat16(), b.bfloat16(), EPS)
    with use_backend("torch"):  # the torch backend has no width limit
        assert add_layernorm(wide, wide, wb, wb, EPS).shape == (2, 4097)


# ----------------------------------------------------------------------------- GPU, real sizes

GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hidden", [768, 1024, 3072, 4096])
def test_add_layernorm_gpu_real_sizes(hidden, dtype):
    tensors, dy = layernorm_inputs((32, 512, hidden), dtype)
    compare_to_reference("triton", lambda x, r, w, b: add_layernorm(x, r, w, b, 1e-12),
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, 1e-12),
             tensors, dy, ["dx", "dresidual", "dweight", "dbias"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hidden", [768, 1024, 3072, 4096])
def test_add_layernorm_dropout_gpu_real_sizes(hidden, dtype):
    shape = (32, 512, hidden)
    tensors, dy = layernorm_inputs(shape, dtype, seed=3)

    def ours(x, r, w, b):
        torch.manual_seed(5)
        return add_layernorm(x, r, w, b, 1e-12, dropout_p=P)

    torch.manual_seed(5)
    keep = K.add_layernorm_keep_mask(shape, P, _draw_seed(DEVICE)).bool()
    kept = keep.float().mean().item()
    assert abs(kept - (1 - P)) < 0.002
    compare_to_reference("triton", ours,
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, 1e-12, P, dropout_mask=keep.to(x.dtype)),
             tensors, dy, ["dx", "dresidual", "dweight", "dbias"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hidden", [768, 1024, 3072, 4096])
def test_layernorm_gelu_gpu_real_sizes(hidden, dtype):
    tensors, dy = layernorm_inputs((32, 512, hidden), dtype, with_residual=False)
    compare_to_reference("triton", lambda x, w, b: layernorm_gelu(x, w, b, 1e-12),
             lambda x, w, b: layernorm_gelu_ref(x, w, b, 1e-12),
             tensors, dy, ["dx", "dweight", "dbias"])

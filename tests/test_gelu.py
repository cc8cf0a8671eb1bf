"""bias_gelu: the Triton backend against a float64 reference; the torch.compile check.

Rule (STYLE.md habit 9): max|ours - ref64| <= 2 * max|baseline - ref64| + floor(dtype),
baseline = the same reference run in the test dtype. Forward and both gradients. Every
tensor the launchers allocate starts as NaN, so an element a kernel fails to write fails.
"""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, ON_GPU, assert_close_to_ref, poison

import fastbert.kernels.gelu as K
import fastbert.kernels.layernorm as KL
from fastbert.ops import use_backend
from fastbert.ops.gelu import bias_gelu, bias_gelu_ref
from fastbert.ops.layernorm import add_layernorm, add_layernorm_ref, layernorm_gelu, layernorm_gelu_ref

# Widths 1, 7, 384, 768, 1000, 3072, 5000 (any width: bias_gelu tiles columns too);
# row counts 1, odd, and more than one row tile (tiles partly padded, dbias programs loop).
SHAPES = [(1, 1), (3, 7), (2, 5, 384), (1, 768), (37, 768), (7, 1000), (3, 3072), (2, 5000)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output and partial-sum buffer the launchers allocate starts as NaN."""
    real = K._empty
    for module in (K, KL):
        monkeypatch.setattr(module, "_empty", lambda shape, dtype, device: poison(real(shape, dtype, device)))


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(*shape, generator=g, dtype=torch.float64)  # spans GELU's curved part and tails
    bias = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    return [x.to(dtype).to(DEVICE), bias.to(dtype).to(DEVICE)], dy.to(dtype).to(DEVICE)


def _run(fn, tensors, dy, dtype=None):
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def _compare(tensors, dy, approximate):
    with use_backend("triton"):
        out, (dx, dbias) = _run(lambda x, b: bias_gelu(x, b, approximate), tensors, dy)
    ref = lambda x, b: bias_gelu_ref(x, b, approximate)  # noqa: E731
    ref_out, (ref_dx, ref_dbias) = _run(ref, tensors, dy, torch.float64)
    base_out, (base_dx, base_dbias) = _run(ref, tensors, dy)
    x, bias = tensors
    assert out.shape == x.shape and out.dtype == x.dtype
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
    assert_close_to_ref(out, ref_out, base_out, "y")
    assert_close_to_ref(dx, ref_dx, base_dx, "dx")
    assert_close_to_ref(dbias, ref_dbias, base_dbias, "dbias")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_matches_reference(shape, dtype):
    tensors, dy = _inputs(shape, dtype)
    _compare(tensors, dy, "none")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (37, 768), (2, 5000)])
def test_bias_gelu_tanh_matches_reference(shape, dtype):
    tensors, dy = _inputs(shape, dtype, seed=1)
    _compare(tensors, dy, "tanh")


def test_bias_gelu_extreme_inputs():
    """Far tails: tanh written with exp must not overflow to NaN; erf saturates cleanly."""
    x = torch.tensor([[-100.0, -30.0, -8.0, -1e-4, 0.0, 1e-4, 8.0, 30.0, 100.0]], device=DEVICE)
    bias = torch.zeros(9, device=DEVICE)
    for approximate in ("none", "tanh"):
        with use_backend("triton"):
            out, (dx, _) = _run(lambda x, b: bias_gelu(x, b, approximate), [x, bias], torch.ones_like(x))
        ref, (ref_dx, _) = _run(lambda x, b: bias_gelu_ref(x, b, approximate), [x, bias], torch.ones_like(x))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(dx, ref_dx, atol=1e-6, rtol=1e-6)


def test_bias_gelu_fp32_bias_with_fp16_x_and_layouts():
    """Mixed precision (fp32 bias, fp16 x), a non-contiguous x and an empty x."""
    (x, bias), dy = _inputs((5, 384), torch.float16)
    bias = bias.float()
    with use_backend("triton"):
        out, (dx, dbias) = _run(lambda x, b: bias_gelu(x, b), [x, bias], dy)
        assert out.dtype == torch.float16 and dbias.dtype == torch.float32
        xt = x.t().contiguous().t()
        assert torch.equal(bias_gelu(xt, bias), out)
        empty = bias_gelu(torch.randn(0, 384, device=DEVICE), bias)
        assert empty.shape == (0, 384)
    ref_out, (ref_dx, ref_dbias) = _run(lambda x, b: bias_gelu_ref(x, b), [x, bias], dy, torch.float64)
    with use_backend("torch"):
        base_out, (base_dx, base_dbias) = _run(lambda x, b: bias_gelu(x, b), [x, bias], dy)
    assert_close_to_ref(out, ref_out, base_out, "y")
    assert_close_to_ref(dx, ref_dx, base_dx, "dx")
    assert_close_to_ref(dbias, ref_dbias, base_dbias, "dbias")


def test_bias_gelu_bad_inputs():
    (x, bias), _ = _inputs((3, 8), torch.float32)
    with use_backend("triton"):
        with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
            bias_gelu(x, bias[:7])
        with pytest.raises(TypeError, match="bias must have x's dtype"):
            bias_gelu(x, bias.half())
        with pytest.raises(ValueError, match="bias is on meta"):
            bias_gelu(x, bias.to("meta"))
        with pytest.raises(TypeError, match="x must be a floating-point"):
            bias_gelu(x.long(), bias)
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            bias_gelu(x, 1.0)
        with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
            bias_gelu(x, bias, "sigmoid")
        with pytest.raises(TypeError, match="the triton backend takes float32, float16 or bfloat16"):
            bias_gelu(x.double(), bias.double())
        if not ON_GPU:
            with pytest.raises(TypeError, match="bfloat16 is not supported by the Triton interpreter"):
                bias_gelu(x.bfloat16(), bias.bfloat16())


# ----------------------------------------------------------------------------- GPU, real sizes

GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("features", [768, 1024, 3072, 4096])
def test_bias_gelu_gpu_real_sizes(features, dtype, approximate):
    tensors, dy = _inputs((32, 512, features), dtype)
    _compare(tensors, dy, approximate)


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    """The three ops traced by torch.compile(fullgraph=True) through their triton_op registrations."""
    (x, bias), dy = _inputs((4, 128, 768), torch.float16)
    g = torch.Generator().manual_seed(1)
    r, w1, b1, w2, b2 = (torch.randn(*s, generator=g).to(DEVICE) for s in [(4, 128, 768), (768,), (768,), (768,), (768,)])
    r, w1, b1, w2, b2 = r.half(), 1 + 0.5 * w1.half(), b1.half(), 1 + 0.5 * w2.half(), b2.half()

    def block(x, r, w1, b1, bias, w2, b2, p):
        h = add_layernorm(x, r, w1, b1, 1e-12, dropout_p=p)
        return layernorm_gelu(bias_gelu(h, bias), w2, b2, 1e-12)

    def block_ref(x, r, w1, b1, bias, w2, b2):
        return layernorm_gelu_ref(bias_gelu_ref(add_layernorm_ref(x, r, w1, b1, 1e-12), bias), w2, b2, 1e-12)

    # p is fixed per compiled function: a float argument could be traced as a symbol.
    compiled = torch.compile(lambda *t: block(*t, 0.0), fullgraph=True)
    compiled_drop = torch.compile(lambda *t: block(*t, 0.1), fullgraph=True)
    tensors = [x, r, w1, b1, bias, w2, b2]
    with use_backend("triton"):
        out, grads = _run(compiled, tensors, dy)
        out_drop, grads_drop = _run(compiled_drop, tensors, dy)
    ref_out, ref_grads = _run(block_ref, tensors, dy, torch.float64)
    base_out, base_grads = _run(block_ref, tensors, dy)
    assert_close_to_ref(out, ref_out, base_out, "compiled y")
    for i, (ours, ref, base) in enumerate(zip(grads, ref_grads, base_grads)):
        assert_close_to_ref(ours, ref, base, f"compiled grad {i}")
    assert torch.isfinite(out_drop).all() and not torch.equal(out_drop, out)
    assert all(torch.isfinite(gr).all() for gr in grads_drop)

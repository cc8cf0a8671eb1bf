"""bias_gelu: the Triton backend against a float64 reference; the torch.compile check.

Rule (STYLE.md habit 9): max|ours - ref64| <= 2 * max|baseline - ref64| + floor(dtype),
baseline = the same reference run in the test dtype. Forward and both gradients. Every
tensor the launchers allocate starts as NaN, so an element a kernel fails to write fails.
"""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, ON_GPU, assert_close_to_ref, guarded_allocations
from layernorm_cases import check_compiled_block, compare_to_reference, gelu_inputs, run_with_grads

import fastbert.kernels.gelu as K
import fastbert.kernels.layernorm as KL
from fastbert.ops import use_backend
from fastbert.ops.gelu import bias_gelu, bias_gelu_ref

# Widths 1, 7, 384, 768, 1000, 3072, 5000 (any width: bias_gelu tiles columns too);
# row counts 1, odd, and more than one row tile (tiles partly padded, dbias programs loop).
SHAPES = [(1, 1), (3, 7), (2, 5, 384), (1, 768), (37, 768), (7, 1000), (3, 3072), (2, 5000)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output and partial-sum buffer the launchers allocate starts as NaN and is the front
    of a longer NaN buffer: at the end of the test the rest must still be NaN (no store past the end)."""
    with guarded_allocations(monkeypatch, (K, KL)):
        yield


def _compare(tensors, dy, approximate):
    compare_to_reference("triton", lambda x, b: bias_gelu(x, b, approximate),
                         lambda x, b: bias_gelu_ref(x, b, approximate), tensors, dy, ["dx", "dbias"])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_matches_reference(shape, dtype):
    tensors, dy = gelu_inputs(shape, dtype)
    _compare(tensors, dy, "none")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (37, 768), (2, 5000)])
def test_bias_gelu_tanh_matches_reference(shape, dtype):
    tensors, dy = gelu_inputs(shape, dtype, seed=1)
    _compare(tensors, dy, "tanh")


def test_bias_gelu_extremegelu_inputs():
    """Far tails: tanh written with exp must not overflow to NaN; erf saturates cleanly."""
    x = torch.tensor([[-100.0, -30.0, -8.0, -1e-4, 0.0, 1e-4, 8.0, 30.0, 100.0]], device=DEVICE)
    bias = torch.zeros(9, device=DEVICE)
    for approximate in ("none", "tanh"):
        with use_backend("triton"):
            out, (dx, _) = run_with_grads(lambda x, b: bias_gelu(x, b, approximate), [x, bias], torch.ones_like(x))
        ref, (ref_dx, _) = run_with_grads(lambda x, b: bias_gelu_ref(x, b, approximate), [x, bias], torch.ones_like(x))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(dx, ref_dx, atol=1e-6, rtol=1e-6)


def test_bias_gelu_fp32_bias_with_fp16_x_and_layouts():
    """Mixed precision (fp32 bias, fp16 x), a non-contiguous x and an empty x."""
    (x, bias), dy = gelu_inputs((5, 384), torch.float16)
    bias = bias.float()
    with use_backend("triton"):
        out, (dx, dbias) = run_with_grads(lambda x, b: bias_gelu(x, b), [x, bias], dy)
        assert out.dtype == torch.float16 and dbias.dtype == torch.float32
        xt = x.t().contiguous().t()
        assert torch.equal(bias_gelu(xt, bias), out)
        empty = bias_gelu(torch.randn(0, 384, device=DEVICE), bias)
        assert empty.shape == (0, 384)
    ref_out, (ref_dx, ref_dbias) = run_with_grads(lambda x, b: bias_gelu_ref(x, b), [x, bias], dy, torch.float64)
    with use_backend("torch"):
        base_out, (base_dx, base_dbias) = run_with_grads(lambda x, b: bias_gelu(x, b), [x, bias], dy)
    assert_close_to_ref(out, ref_out, base_out, "y")
    assert_close_to_ref(dx, ref_dx, base_dx, "dx")
    assert_close_to_ref(dbias, ref_dbias, base_dbias, "dbias")


def test_bias_gelu_badgelu_inputs():
    (x, bias), _ = gelu_inputs((3, 8), torch.float32)
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
    tensors, dy = gelu_inputs((32, 512, features), dtype)
    _compare(tensors, dy, approximate)


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    """The three ops traced by torch.compile(fullgraph=True) through their triton_op registrations."""
    check_compiled_block("triton")


def test_launch_size_helpers_equal_tritons():
    """The launchers' cdiv / next_power_of_2 (plain Python: Triton's cost ~2 us a call) agree
    with Triton's own over every size they meet, and hand symbolic sizes to Triton's."""
    import triton

    from fastbert.kernels.gelu import _cdiv, _next_pow2
    assert all(_next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 8193))
    assert all(_cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 130))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_mixed_bias_keeps_x_not_the_float32_sum(dtype, approximate):
    """A half x with a float32 bias (a BERT layer under autocast) on the torch backend: GELU kept its
    float32 input for the backward, twice x's bytes. Now x and bias are kept, and the output and
    both gradients are eager PyTorch's, bit for bit (the float32 sum recomputed in the backward)."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 9, 96, generator=gen) * 3).to(dtype).requires_grad_()
    bias = torch.randn(96, generator=gen).requires_grad_()
    dy = torch.randn(4, 9, 96, generator=gen).to(dtype)
    kept = []

    def pack(t):
        kept.append((t.dtype, tuple(t.shape)))
        return t

    with use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bias_gelu(x, bias, approximate)
    assert (torch.float32, tuple(x.shape)) not in kept, kept
    assert sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for d, s in kept) <= \
        x.numel() * x.element_size() + bias.numel() * 4
    grads = torch.autograd.grad(y, (x, bias), dy)
    ref = bias_gelu_ref(x, bias, approximate).to(dtype)
    ref_grads = torch.autograd.grad(ref, (x, bias), dy)
    assert torch.equal(y, ref)
    for name, ours, theirs in zip(("dx", "dbias"), grads, ref_grads):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
    # a second derivative still flows (the backward is made of differentiable ops)
    with use_backend("torch"):
        y = bias_gelu(x, bias, approximate)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.float().sum(), x)
    ref = bias_gelu_ref(x, bias, approximate).to(dtype)
    (ref_dx,) = torch.autograd.grad(ref, x, dy, create_graph=True)
    assert torch.equal(ddx, torch.autograd.grad(ref_dx.float().sum(), x)[0])


def test_torch_backend_mixed_bias_takes_torch_func():
    """torch.func (jacrev, vmap: per-sample gradients) ran through the torch backend's bias_gelu, plain
    PyTorch; its mixed-dtype Function, without setup_context, refused every functorch transform."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=gen).to(torch.bfloat16)
    bias = torch.randn(8, generator=gen)
    with use_backend("torch"):
        ours = torch.func.jacrev(lambda t: bias_gelu(t, bias))(x)
        per_row = torch.vmap(torch.func.grad(lambda row: bias_gelu(row, bias).float().sum()))(x)
    assert torch.equal(ours, torch.func.jacrev(lambda t: bias_gelu_ref(t, bias).to(t.dtype))(x))
    assert torch.equal(per_row, torch.vmap(torch.func.grad(lambda row: bias_gelu_ref(row, bias).to(row.dtype).float().sum()))(x))

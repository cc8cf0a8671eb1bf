"""add_layernorm, layernorm_gelu and bias_gelu on the "cuda" backend (csrc/layernorm*.cu,
csrc/gelu*.cu through fastbert._C and fastbert/ops/_cuda.py).

Forward and every gradient against the float64 reference under the house rule
max|ours - ref64| <= 2 * max|baseline - ref64| + floor(dtype), the baseline being the
reference run in the test dtype (and, on the GPU, the Triton backend too). Every output
the launchers allocate starts as NaN inside a NaN guard zone that must stay NaN, so an
element a kernel fails to write, or writes past, fails. The shapes reach every launch
configuration: 16-byte chunks with one warp per row, with a block per row (wide rows),
and the scalar fallback (odd widths, or a row start off the 16-byte grid).

The `mode` fixture runs each test twice: "gpu" (marked gpu: the compiled kernels) and
"emu" (no GPU: the same kernels, launchers and bindings compiled with g++ against the
CPU emulation in tests/test_cuda_build.py, on CPU tensors, bfloat16 included). Real
BERT sizes, torch.compile and the Triton comparisons run on the GPU only.
"""
import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_ref, guarded_allocations
from layernorm_cases import (
    check_autocast_mix, check_compiled_block, check_overflowing_squares_give_nan, compare_to_reference, gelu_inputs,
    layernorm_inputs, run_with_grads,
)

import fastbert.ops._cuda as C
from fastbert.ops import use_backend
from fastbert.ops.gelu import bias_gelu, bias_gelu_ref
from fastbert.ops.layernorm import (
    _draw_seed, add_layernorm, add_layernorm_ref, layernorm_gelu, layernorm_gelu_ref,
)

EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
P = 0.1
GUARD = 64  # poisoned elements after every output

# Hidden sizes reaching every configuration of csrc/layernorm.cuh in each dtype (chunks of
# 16 bytes: 4 fp32 / 8 fp16 columns): 64/256 (one warp, one chunk per thread), 384, 768, 1024,
# 2048, 4096 (one warp up to 4 chunks per thread, then 128/256/512-thread blocks), 1, 7,
# 1022, 4095 (scalar fallback, one warp or a whole block); rows: 1, odd, several per block.
SHAPES = [
    (5, 1), (3, 7), (6, 64), (3, 256), (37, 384), (3, 5, 768), (13, 1000), (9, 1022), (4, 1024), (3, 2048),
    (2, 4096), (3, 4095),
]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output and partial-sum buffer the CUDA launchers allocate starts as NaN (7 for
    ints) and is followed by GUARD poisoned elements that must still be poisoned at the end."""
    with guarded_allocations(monkeypatch, (C,), GUARD):
        yield


def _compare(fn_ours, fn_ref, tensors, dy, names, triton=True):
    """The cuda backend against float64, with the reference in the test dtype and (on the
    GPU, where triton is installed) the Triton backend as the two baselines."""
    out, grads, ref_out, ref_grads = compare_to_reference("cuda", fn_ours, fn_ref, tensors, dy, names)
    if triton and tensors[0].is_cuda:
        pytest.importorskip("triton")
        with use_backend("triton"):
            tri_out, tri_grads = run_with_grads(fn_ours, tensors, dy)
        assert_close_to_ref(out, ref_out, tri_out, "y vs triton")
        for name, ours, ref, tri in zip(names, grads, ref_grads, tri_grads):
            assert_close_to_ref(ours, ref, tri, f"{name} vs triton")


def _misaligned(t):
    """The same values in a contiguous tensor whose start is 2 elements past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 2, dtype=t.dtype, device=t.device)
    out = buf[2:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# ----------------------------------------------------------------------------- add_layernorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_layernorm_matches_reference(cuda_device, shape, dtype):
    tensors, dy = layernorm_inputs(shape, dtype, cuda_device)
    _compare(lambda x, r, w, b: add_layernorm(x, r, w, b, EPS),
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, EPS),
             tensors, dy, ["dx", "dresidual", "dweight", "dbias"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_layernorm_fp32_params_misaligned_and_empty(cuda_device, dtype):
    """Mixed precision (fp32 weight/bias), a row start off the 16-byte grid (scalar path),
    a non-contiguous x (copied) and no rows at all."""
    (x, r, w, b), dy = layernorm_inputs((3, 5, 768), dtype, cuda_device)
    w, b = w.float(), b.float()
    names = ["dx", "dresidual", "dweight", "dbias"]
    _compare(lambda x, r, w, b: add_layernorm(x, r, w, b, EPS),
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, EPS), [x, r, w, b], dy, names)
    _compare(lambda x, r, w, b: add_layernorm(x, r, w, b, EPS),
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, EPS),
             [_misaligned(x), _misaligned(r), w, b], _misaligned(dy), names)
    with use_backend("cuda"):
        x2, r2 = x.view(15, 768), r.view(15, 768)
        xt = x2.t().contiguous().t()
        assert not xt.is_contiguous()
        assert torch.equal(add_layernorm(xt, r2, w, b, EPS), add_layernorm(x2, r2, w, b, EPS))
        (x0, r0, w0, b0), dy0 = layernorm_inputs((0, 384), dtype, cuda_device)
        out, (dx, dr, dw, db) = run_with_grads(lambda x, r, w, b: add_layernorm(x, r, w, b, EPS), [x0, r0, w0, b0], dy0)
    assert out.shape == (0, 384) and dx.shape == (0, 384)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, P])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 768), (9, 1022), (2, 4096), (3, 7)])
def test_add_layernorm_autocast_mix(cuda_device, shape, dtype, dropout_p, copy, monkeypatch):
    """Half x with the fp32 residual stream, as autocast hands them over: the kernels read
    the mix as it is (16-byte chunks of x, 32-byte chunks of the residual; the scalar path
    for odd widths); y and dresidual fp32, dx in x's dtype."""
    seen = []
    for name in ("add_layernorm_fwd", "add_layernorm_bwd"):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, real=real, name=name, **kw: seen.append(
            (name, a[0].dtype, a[1].dtype, a[2].dtype)) or real(*a, **kw))
    check_autocast_mix("cuda", cuda_device, shape, dtype, dropout_p,
                       keep_mask=lambda shape, seed: C.add_layernorm_keep_mask(shape, dropout_p, seed), copy=copy)
    assert ("add_layernorm_fwd", dtype, torch.float32, torch.float32) in seen, seen
    assert ("add_layernorm_bwd", torch.float32, dtype, torch.float32) in seen, seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_layernorm_gradient_through_the_copy_alone(cuda_device, dtype):
    """Under autocast with copy_in_x_dtype the next layer may use the half copy only (y's own
    gradient is then None): the backward runs with a zero dy in the residual's dtype (float32),
    and every gradient is the copy's, as if it had been added to y's."""
    (x, r, w, b), dy = layernorm_inputs((3, 64), torch.float32, cuda_device, seed=7)
    tensors, dy_copy = [x.to(dtype), r, w, b], dy.to(dtype)

    def grads_through_copy(backend):
        leaves = [t.detach().requires_grad_() for t in tensors]
        with use_backend(backend), torch.autocast(cuda_device.type, dtype=dtype):
            _, y_copy = add_layernorm(*leaves, EPS, copy_in_x_dtype=True)
        return torch.autograd.grad(y_copy, leaves, dy_copy)

    ours, base = grads_through_copy("cuda"), grads_through_copy("torch")
    leaves64 = [t.detach().double().requires_grad_() for t in tensors]
    ref = torch.autograd.grad(add_layernorm_ref(*leaves64, EPS), leaves64, dy_copy.double())
    for name, o, r64, b64, t in zip(["dx", "dresidual", "dweight", "dbias"], ours, ref, base, tensors):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_close_to_ref(o, r64, b64, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [768, 1024, 3072, 4096])
def test_add_layernorm_real_sizes(hidden, dtype):
    """32 x 512 rows: the backward's blocks loop over many rows each."""
    tensors, dy = layernorm_inputs((32, 512, hidden), dtype, DEVICE)
    _compare(lambda x, r, w, b: add_layernorm(x, r, w, b, 1e-12),
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, 1e-12),
             tensors, dy, ["dx", "dresidual", "dweight", "dbias"])


# ----------------------------------------------------------------------------- dropout

def test_dropout_same_seed_same_output(cuda_device):
    (x, r, w, b), _ = layernorm_inputs((3, 5, 768), torch.float16, cuda_device)
    with use_backend("cuda"):
        torch.manual_seed(1)
        y1 = add_layernorm(x, r, w, b, EPS, dropout_p=P)
        torch.manual_seed(1)
        y2 = add_layernorm(x, r, w, b, EPS, dropout_p=P)
        y3 = add_layernorm(x, r, w, b, EPS, dropout_p=P)
        y0 = add_layernorm(x, r, w, b, EPS)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3)
    assert not torch.equal(y1, y0)


def test_launcher_refuses_dropout_p_out_of_range(cuda_device):
    """fastbert.ops._cuda's launcher hands dropout_p to fastbert._C unchecked (add_layernorm checks
    it first); the C++ launcher refuses p outside [0, 1) (p = 1 would drop every x)."""
    (x, r, w, b), _ = layernorm_inputs((3, 8), torch.float32, cuda_device)
    seed = torch.tensor([1], dtype=torch.int64, device=cuda_device)
    for p in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"add_layernorm_fwd: dropout_p must be in \[0, 1\)"):
            C.add_layernorm_fwd(x, r, w, b, EPS, p, seed)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(cuda_device, p):
    seed = torch.tensor([1234], dtype=torch.int64, device=cuda_device)
    keep = C.add_layernorm_keep_mask((2, 32, 1000), p, seed)
    assert keep.dtype == torch.int8 and keep.shape == (2, 32, 1000)
    assert ((keep == 0) | (keep == 1)).all(), "keep-mask element not written"
    n = keep.numel()
    kept = keep.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sigma, f"kept {kept:.4f}, expected {1 - p} +- {6 * sigma:.4f}"
    rows = keep.view(-1, 1000)
    assert not torch.equal(rows[0], rows[1]), "rows share one mask: offsets ignore the row"
    assert not torch.equal(keep, C.add_layernorm_keep_mask((2, 32, 1000), p, seed + 1)), "the seed is ignored"


@pytest.mark.parametrize("n", [7, 16, 768, 1000])
def test_dropout_mask_equals_triton_mask(cuda_device, n):
    """Both backends draw Philox4x32-10 at the same (seed, row * ceil(N/4) + col/4) offsets,
    so one seed gives one mask (not required by the design, but it is what csrc/ implements:
    a difference means the CUDA Philox or its offsets are wrong). Without a GPU the Triton
    side runs in the interpreter."""
    K = pytest.importorskip("fastbert.kernels.layernorm")
    seed = torch.tensor([99], dtype=torch.int64, device=cuda_device)
    ours = C.add_layernorm_keep_mask((5, n), 0.3, seed)
    assert torch.equal(ours, K.add_layernorm_keep_mask((5, n), 0.3, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 768), (13, 1000), (2, 7), (9, 1022), (4, 4096)])
def test_dropout_matches_reference_with_same_mask(cuda_device, shape, dtype):
    """The kernels' mask is the keep-mask launcher's (same seed: the Function's first draw)."""
    tensors, dy = layernorm_inputs(shape, dtype, cuda_device, seed=3)

    def ours(x, r, w, b):
        torch.manual_seed(5)
        return add_layernorm(x, r, w, b, EPS, dropout_p=P)

    torch.manual_seed(5)
    keep = C.add_layernorm_keep_mask(shape, P, _draw_seed(cuda_device)).bool()
    assert 0 < keep.sum() < keep.numel()
    _compare(ours,
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, EPS, P, dropout_mask=keep.to(x.dtype)),
             tensors, dy, ["dx", "dresidual", "dweight", "dbias"], triton=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [768, 1024, 4096])
def test_dropout_real_sizes(hidden, dtype):
    shape = (32, 512, hidden)
    tensors, dy = layernorm_inputs(shape, dtype, DEVICE, seed=3)

    def ours(x, r, w, b):
        torch.manual_seed(5)
        return add_layernorm(x, r, w, b, 1e-12, dropout_p=P)

    torch.manual_seed(5)
    keep = C.add_layernorm_keep_mask(shape, P, _draw_seed(DEVICE)).bool()
    assert abs(keep.float().mean().item() - (1 - P)) < 0.002
    _compare(ours,
             lambda x, r, w, b: add_layernorm_ref(x, r, w, b, 1e-12, P, dropout_mask=keep.to(x.dtype)),
             tensors, dy, ["dx", "dresidual", "dweight", "dbias"], triton=False)


# ----------------------------------------------------------------------------- layernorm_gelu

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_gelu_matches_reference(cuda_device, shape, dtype):
    tensors, dy = layernorm_inputs(shape, dtype, cuda_device, with_residual=False)
    _compare(lambda x, w, b: layernorm_gelu(x, w, b, EPS),
             lambda x, w, b: layernorm_gelu_ref(x, w, b, EPS),
             tensors, dy, ["dx", "dweight", "dbias"])


def test_rows_of_overflowing_squares_give_nan_as_torch_does(cuda_device):
    check_overflowing_squares_give_nan("cuda", cuda_device)


def test_layernorm_gelu_fp32_params_and_misaligned(cuda_device):
    (x, w, b), dy = layernorm_inputs((7, 1024), torch.bfloat16, cuda_device, with_residual=False)
    _compare(lambda x, w, b: layernorm_gelu(x, w, b, EPS),
             lambda x, w, b: layernorm_gelu_ref(x, w, b, EPS),
             [_misaligned(x), w.float(), b.float()], _misaligned(dy), ["dx", "dweight", "dbias"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [768, 1024, 3072, 4096])
def test_layernorm_gelu_real_sizes(hidden, dtype):
    tensors, dy = layernorm_inputs((32, 512, hidden), dtype, DEVICE, with_residual=False)
    _compare(lambda x, w, b: layernorm_gelu(x, w, b, 1e-12),
             lambda x, w, b: layernorm_gelu_ref(x, w, b, 1e-12),
             tensors, dy, ["dx", "dweight", "dbias"])


# ----------------------------------------------------------------------------- bias_gelu

# Widths: 1 and 7 (single columns), 384/768 (narrow 16-byte blocks), 1000, 3072, 5000 (wide);
# 103 x 16: many rows, so the backward's blocks loop and the block reduction has 8 row slices;
# 300 x 16: 10 blocks down the rows (the emulation's 2 SMs x 5), so the column sums add 10 partial rows.
GELU_SHAPES = [(1, 1), (3, 7), (2, 5, 384), (1, 768), (37, 768), (7, 1000), (3, 3072), (2, 5000), (103, 16),
               (300, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GELU_SHAPES)
def test_bias_gelu_matches_reference(cuda_device, shape, dtype):
    tensors, dy = gelu_inputs(shape, dtype, cuda_device)
    _compare(lambda x, b: bias_gelu(x, b), lambda x, b: bias_gelu_ref(x, b), tensors, dy, ["dx", "dbias"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (37, 768), (2, 5000), (103, 16)])
def test_bias_gelu_tanh_matches_reference(cuda_device, shape, dtype):
    tensors, dy = gelu_inputs(shape, dtype, cuda_device, seed=1)
    _compare(lambda x, b: bias_gelu(x, b, "tanh"), lambda x, b: bias_gelu_ref(x, b, "tanh"),
             tensors, dy, ["dx", "dbias"])


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [768, 1024, 3072, 4096])
def test_bias_gelu_real_sizes(features, dtype, approximate):
    tensors, dy = gelu_inputs((32, 512, features), dtype, DEVICE)
    _compare(lambda x, b: bias_gelu(x, b, approximate), lambda x, b: bias_gelu_ref(x, b, approximate),
             tensors, dy, ["dx", "dbias"])


def test_bias_gelu_extreme_inputs_fp32_bias_and_layouts(cuda_device):
    # the tails, and the curved part (|x| 1..3), where a constant of either form that is a little off shows
    x = torch.tensor([[-100.0, -30.0, -8.0, -3.0, -2.0, -1.5, -1.0, -1e-4, 0.0, 1e-4, 1.0, 1.5, 2.0, 3.0, 8.0, 30.0,
                       100.0]], device=cuda_device)
    bias = torch.zeros(17, device=cuda_device)
    for approximate in ("none", "tanh"):
        with use_backend("cuda"):
            out, (dx, _) = run_with_grads(lambda x, b: bias_gelu(x, b, approximate), [x, bias], torch.ones_like(x))
        ref, (ref_dx, _) = run_with_grads(lambda x, b: bias_gelu_ref(x, b, approximate), [x, bias], torch.ones_like(x))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(dx, ref_dx, atol=1e-6, rtol=1e-6)
    (x, bias), dy = gelu_inputs((5, 384), torch.float16, cuda_device)
    # fp32 bias: the reference promotes to fp32; the op returns x's dtype (as the torch backend does).
    _compare(lambda x, b: bias_gelu(x, b), lambda x, b: bias_gelu_ref(x, b).to(x.dtype), [x, bias.float()], dy,
             ["dx", "dbias"])
    _compare(lambda x, b: bias_gelu(x, b), lambda x, b: bias_gelu_ref(x, b), [_misaligned(x), bias], _misaligned(dy),
             ["dx", "dbias"])
    with use_backend("cuda"):
        xt = x.t().contiguous().t()
        assert torch.equal(bias_gelu(xt, bias), bias_gelu(x, bias))
        assert bias_gelu(torch.randn(0, 384, device=cuda_device, dtype=torch.float16), bias).shape == (0, 384)
        _, (dx0, db0) = run_with_grads(lambda x, b: bias_gelu(x, b), [torch.randn(0, 384, device=cuda_device), bias.float()],
                             torch.zeros(0, 384, device=cuda_device))
        assert torch.equal(db0, torch.zeros_like(db0))
    # no features: the launchers themselves (the public op sends n == 0 to torch) made view(-1, 0) of it
    from fastbert.ops import _cuda
    x0, b0 = torch.empty(3, 0, device=cuda_device, dtype=torch.float16), torch.empty(0, device=cuda_device)
    assert _cuda.bias_gelu_fwd(x0, b0).shape == (3, 0)
    dx0, db0 = _cuda.bias_gelu_bwd(x0, x0, b0)
    assert dx0.shape == (3, 0) and db0.shape == (0,)


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.gpu
def test_torch_compile_fullgraph():
    """The three ops traced by torch.compile(fullgraph=True) through their custom ops
    (fastbert::*_cuda with fake functions)."""
    check_compiled_block("cuda")


# ----------------------------------------------------------------------------- Python-side checks

@pytest.mark.skipif(ON_GPU, reason="checks the refusal of CPU tensors")
def test_cuda_path_refuses_cpu_tensors(monkeypatch):
    """Forced onto the cuda backend, CPU tensors stop in Python with a clear error (the raw
    pointers never reach fastbert._C, built or not)."""
    import fastbert.ops.gelu as G
    import fastbert.ops.layernorm as L

    monkeypatch.setattr(L, "resolve", lambda cuda_device: "cuda")
    monkeypatch.setattr(G, "resolve", lambda cuda_device: "cuda")
    (x, r, w, b), _ = layernorm_inputs((3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="add_layernorm: the cuda backend needs CUDA tensors, x is on cpu"):
        add_layernorm(x, r, w, b, EPS)
    with pytest.raises(ValueError, match="layernorm_gelu: the cuda backend needs CUDA tensors"):
        layernorm_gelu(x, w, b, EPS)
    with pytest.raises(ValueError, match="bias_gelu: the cuda backend needs CUDA tensors"):
        bias_gelu(x, b)
    # what the kernels do not take: the cuda backend's own errors when it is named ("auto" runs it on torch)
    with use_backend("cuda"):
        with pytest.raises(TypeError, match="the cuda backend takes float32, float16 or bfloat16 x, got torch.float64"):
            layernorm_gelu(x.double(), w.double(), b.double(), EPS)
        with pytest.raises(ValueError, match=r"the cuda backend takes hidden sizes 1\.\.4096"):
            wide = torch.zeros(2, 4097)
            add_layernorm(wide, wide, wide[0], wide[0], EPS)


def test_missing_extension_is_a_clear_error(monkeypatch):
    import fastbert.ops._backend as B

    monkeypatch.setattr(B, "cuda_extension", lambda: None)
    with pytest.raises(RuntimeError, match="needs the compiled extension fastbert._C"):
        C.ext()


def test_warps_running_ahead_of_each_other_change_no_bit(cuda_device, monkeypatch):
    """The emulation's round robin moves every warp one collective a pass, in step, so a race
    between warps through shared memory (a missing __syncthreads before scratch is reused) gave
    the right answer and passed. FBEMU_SCHEDULE=greedy / greedy_desc lets one warp run ahead as
    far as the barriers allow; every output and gradient must be bitwise the round robin's.
    Shapes whose rows span several warps (the block-wide row reductions), and the span score."""
    if cuda_device.type != "cpu":
        pytest.skip("the emulation's thread schedules")
    from fastbert.ops.span import span_score

    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    cases = []
    for hidden, dtype in ((384, torch.float32), (768, torch.float16), (4096, torch.float32)):
        x, r, w, b = leaf(3, hidden, dtype=dtype), leaf(3, hidden, dtype=dtype), leaf(hidden), leaf(hidden)
        cases += [(lambda x=x, r=r, w=w, b=b: add_layernorm(x, r, w, b, 1e-12), (x, r, w, b)),
                  (lambda x=x, w=w, b=b: layernorm_gelu(x, w, b, 1e-12), (x, w, b)),
                  (lambda x=x, b=b: bias_gelu(x, b), (x, b))]
    s, e = torch.randn(3, 200, generator=gen), torch.randn(3, 200, generator=gen)

    def run():
        outs = []
        with use_backend("cuda"):
            for fn, inputs in cases:
                y = fn()
                outs += [y.detach(), *torch.autograd.grad(y, inputs, torch.ones_like(y))]
            outs += list(span_score(s, e, None, 30, 20))
        return outs

    monkeypatch.delenv("FBEMU_SCHEDULE", raising=False)
    expected = run()
    for schedule in ("greedy", "greedy_desc"):
        monkeypatch.setenv("FBEMU_SCHEDULE", schedule)
        for k, (got, want) in enumerate(zip(run(), expected)):
            assert torch.equal(got, want), f"{schedule}: output {k} differs from the round robin's"

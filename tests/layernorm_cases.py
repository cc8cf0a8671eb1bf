"""Inputs and comparisons shared by the Triton and CUDA tests of the LayerNorm/GELU family
(tests/test_layernorm.py, tests/test_gelu.py, tests/test_cuda_layernorm.py).

Rule (STYLE.md habit 9): max|ours - ref64| <= 2 * max|baseline - ref64| + floor(dtype),
baseline = the same reference run in the test dtype; forward and every gradient.
"""
import torch

from conftest import DEVICE, assert_close_to_ref

from fastbert.ops import use_backend
from fastbert.ops.gelu import bias_gelu, bias_gelu_ref
from fastbert.ops.layernorm import add_layernorm, add_layernorm_ref, layernorm_gelu, layernorm_gelu_ref


def layernorm_inputs(shape, dtype, device=DEVICE, with_residual=True, seed=0):
    """([x, residual, weight, bias] or [x, weight, bias], dy) in `dtype` on `device`."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x, residual = rand(*shape), rand(*shape)
    weight, bias = 1.0 + 0.5 * rand(n), 0.5 * rand(n)
    dy = rand(*shape)
    tensors = [x, residual, weight, bias] if with_residual else [x, weight, bias]
    return [t.to(dtype).to(device) for t in tensors], dy.to(dtype).to(device)


def gelu_inputs(shape, dtype, device=DEVICE, seed=0):
    """([x, bias], dy): x spans GELU's curved part and both tails."""
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(*shape, generator=g, dtype=torch.float64)
    bias = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    return [x.to(dtype).to(device), bias.to(dtype).to(device)], dy.to(dtype).to(device)


def run_with_grads(fn, tensors, dy, dtype=None):
    """fn's output and the gradients of every input, with inputs cast to `dtype`."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def compare_to_reference(backend, fn_ours, fn_ref, tensors, dy, names):
    """fn_ours on `backend` against fn_ref in float64, the baseline being fn_ref in the test
    dtype on the "torch" backend. Returns (out, grads, ref_out, ref_grads) for further checks."""
    with use_backend(backend):
        out, grads = run_with_grads(fn_ours, tensors, dy)
    ref_out, ref_grads = run_with_grads(fn_ref, tensors, dy, torch.float64)
    with use_backend("torch"):
        base_out, base_grads = run_with_grads(fn_ref, tensors, dy)
    assert out.shape == tensors[0].shape and out.dtype == tensors[0].dtype
    assert_close_to_ref(out, ref_out, base_out, "y")
    for name, ours, ref, base, t in zip(names, grads, ref_grads, base_grads, tensors):
        assert ours.shape == t.shape and ours.dtype == t.dtype, name
        assert_close_to_ref(ours, ref, base, name)
    return out, grads, ref_out, ref_grads


def check_compiled_block(backend):
    """add_layernorm -> bias_gelu -> layernorm_gelu traced by torch.compile(fullgraph=True)
    through the backend's registered custom ops (fake functions give the shapes), against
    float64, with and without dropout."""
    (x, bias), dy = gelu_inputs((4, 128, 768), torch.float16, DEVICE)
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
    with use_backend(backend):
        out, grads = run_with_grads(compiled, tensors, dy)
        out_drop, grads_drop = run_with_grads(compiled_drop, tensors, dy)
    ref_out, ref_grads = run_with_grads(block_ref, tensors, dy, torch.float64)
    base_out, base_grads = run_with_grads(block_ref, tensors, dy)
    assert_close_to_ref(out, ref_out, base_out, "compiled y")
    for i, (ours, ref, base) in enumerate(zip(grads, ref_grads, base_grads)):
        assert_close_to_ref(ours, ref, base, f"compiled grad {i}")
    assert torch.isfinite(out_drop).all() and not torch.equal(out_drop, out)
    assert all(torch.isfinite(gr).all() for gr in grads_drop)


def check_autocast_mix(backend, device, shape, dtype, dropout_p=0.0, keep_mask=None, copy=False):
    """add_layernorm under autocast as a BERT layer meets it: x a Linear's `dtype` output,
    the residual stream, weight and bias float32. The kernel backends take the mix as it is;
    the result must be the promoted computation's: y and dresidual float32, dx in x's dtype,
    each within the house rule of the float64 reference, the baseline being the "torch"
    backend under the same autocast (which promotes x first).

    copy: also ask for y in x's dtype (copy_in_x_dtype=True), as the next Linear reads it:
    it must equal y.to(dtype) bit for bit, and its gradient (a second, `dtype` upstream
    gradient) must reach x, residual, weight and bias as if added to y's.

    keep_mask(shape, seed) -> bool: the backend's dropout mask for the seed its Function
    draws first (torch.manual_seed(5)), so the reference can apply the same one.
    """
    from fastbert.ops.layernorm import _draw_seed
    (x, r, w, b), dy = layernorm_inputs(shape, torch.float32, device, seed=7)
    x = x.to(dtype)
    dy_copy = (0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(11))).to(dtype).to(device)
    keep = None
    if dropout_p > 0.0:
        torch.manual_seed(5)
        keep = keep_mask(shape, _draw_seed(device)).bool()
        assert 0 < keep.sum() < keep.numel()

    def ours(x, r, w, b):
        torch.manual_seed(5)  # the Function's first draw is its dropout seed
        with torch.autocast(device.type, dtype=dtype):
            return add_layernorm(x, r, w, b, 1e-5, dropout_p, copy_in_x_dtype=copy)

    def ref(x, r, w, b):
        mask = None if keep is None else keep.to(x.dtype)
        return add_layernorm_ref(x, r, w, b, 1e-5, dropout_p, dropout_mask=mask)

    def run(fn, tensors, cast=None):
        """(y, y's copy or None, gradients) of fn, y's gradient dy (+ dy_copy through the copy)."""
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_(True) for t in tensors]
        out = fn(*leaves)
        y, y_copy = out if isinstance(out, tuple) else (out, None)
        if y_copy is not None:
            grads = torch.autograd.grad((y, y_copy), leaves, (dy.to(y.dtype), dy_copy))
        elif copy:  # the float64 reference: the copy is y itself
            grads = torch.autograd.grad(y, leaves, dy.to(y.dtype) + dy_copy.to(y.dtype))
        else:
            grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
        return y.detach(), (None if y_copy is None else y_copy.detach()), [g.detach() for g in grads]

    tensors = [x, r, w, b]
    with use_backend(backend):
        out, out_copy, grads = run(ours, tensors)
    ref_out, _, ref_grads = run(ref, tensors, torch.float64)
    if keep is None:
        with use_backend("torch"):
            base_out, _, base_grads = run(ours, tensors)
    else:  # the torch backend draws another mask: the promoted reference with this one
        def base(x, r, w, b):
            y = ref(x.float(), r, w, b)
            return (y, y.to(dtype)) if copy else y
        base_out, _, base_grads = run(base, tensors)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close_to_ref(out, ref_out, base_out, "y")
    if copy:
        assert out_copy is not None and out_copy.dtype == dtype
        assert torch.equal(out_copy, out.to(dtype)), "the copy is not y in x's dtype"
    for name, ours_g, ref_g, base_g, t in zip(["dx", "dresidual", "dweight", "dbias"], grads, ref_grads,
                                              base_grads, tensors):
        assert ours_g.dtype == t.dtype and ours_g.shape == t.shape, name
        assert_close_to_ref(ours_g, ref_g, base_g, name)
    return out, grads


def check_overflowing_squares_give_nan(backend, device):
    """float32 rows whose centred squares pass float32's range (|h - mean| ~ 1e30): the corrected
    variance is inf - inf = NaN. It stays NaN, as torch's LayerNorm gives; clamped to 0 it made
    rstd 1/sqrt(eps) and outputs of 1e34 that looked like numbers. Ordinary rows beside it are
    untouched."""
    from fastbert.ops import use_backend
    from fastbert.ops.layernorm import add_layernorm, layernorm_gelu

    n = 256
    gen = torch.Generator().manual_seed(0)
    huge = 1e30 * (0.9 + 0.1 * torch.rand(2, n, generator=gen, dtype=torch.float64))
    x = torch.cat([huge[:1], torch.randn(1, n, generator=gen, dtype=torch.float64)]).float().to(device)
    r = torch.cat([huge[1:], torch.randn(1, n, generator=gen, dtype=torch.float64)]).float().to(device)
    w, b = torch.ones(n, device=device), torch.zeros(n, device=device)
    with use_backend(backend):
        outs = {"add_layernorm": add_layernorm(x, r, w, b, 1e-12), "layernorm_gelu": layernorm_gelu(x + r, w, b, 1e-12)}
    with use_backend("torch"):
        refs = {"add_layernorm": add_layernorm(x, r, w, b, 1e-12), "layernorm_gelu": layernorm_gelu(x + r, w, b, 1e-12)}
    for name, y in outs.items():
        assert torch.isnan(y[0]).all(), f"{name}: a row of overflowing squares gave {y[0, :3].tolist()}"
        assert torch.isnan(refs[name][0]).all()                     # what torch's LayerNorm gives
        torch.testing.assert_close(y[1], refs[name][1], atol=1e-5, rtol=1e-5)

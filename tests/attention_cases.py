"""Inputs, references and checks shared by the Triton and CUDA attention tests
(tests/test_attention.py, tests/test_cuda_attention.py)."""
import torch

from conftest import DEVICE

from fastbert.ops import use_backend
from fastbert.ops.attention import attention, attention_ref


def qkv(shape, dtype, gen, device=DEVICE):
    """Fresh normal q, k, v in `dtype` (drawn in float64; no exact zeros)."""
    return [torch.randn(shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]


def key_mask(kind, B, S, gen, device=DEVICE):
    """(B, S) bool key mask: None, mixed prefix lengths, or holes anywhere with the last row fully padded."""
    if kind is None:
        return None
    if kind == "lengths":
        lens = torch.randint(1, S + 1, (B,), generator=gen)
        lens[0] = S
        mask = torch.arange(S)[None, :] < lens[:, None]
    else:
        mask = torch.rand(B, S, generator=gen) > 0.4
        mask[:, 0] = True
        mask[-1] = False
    return mask.to(device)


def philox7(seed, c0, c1, c2, c3):
    """The four words of Philox-4x32 with 7 rounds (tl.philox, csrc/attention.cuh), in Python."""
    m32 = 0xFFFFFFFF
    k0, k1 = seed & m32, (seed >> 32) & m32
    for _ in range(7):
        p0, p1 = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = (p0 >> 32) ^ c1 ^ k0, p0 & m32, (p1 >> 32) ^ c3 ^ k1, p1 & m32
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    return c0, c1, c2, c3


def ref_with_grads(q, k, v, do, mask, dropout_p, scale, keep, dtype):
    """(out, dq, dk, dv) of attention_ref computed in `dtype` (float64 for the reference)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = attention_ref(*leaves, mask=mask, dropout_p=dropout_p, softmax_scale=scale, dropout_mask=keep)
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return (out.detach(), *grads)


def check_out_residual(out, out_residual):
    """out_residual is out's rounding error (the forward's fp32 output minus out, in out's dtype):
    written everywhere (outputs are poisoned), and within half a unit in the last place of out.
    Its value is checked where it matters, by the backward's gradients (D_i = dO . (out + residual))."""
    assert torch.isfinite(out_residual).all(), "out_residual has unwritten or non-finite elements"
    finfo = torch.finfo(out.dtype)
    mag = out.double().abs()
    ulp = torch.exp2(torch.floor(torch.log2(mag.clamp_min(finfo.smallest_normal)))) * finfo.eps
    worst = (out_residual.double().abs() / (ulp / 2)).max().item()
    assert worst <= 1.0, f"out_residual is up to {worst:.3g} half-ulps of out: not out's rounding error"


def assert_residual_sharpens_delta(launch, device=DEVICE):
    """With out's residual the backward's D_i is the fp32 output's: on values sharing a mean
    (v + 10, where the rounding of out times dO cancels in dP_ij - D_i) dq and dk come out more
    than 2x closer to float64 than from the rounded out alone. A backward that ignored the
    residual, or a forward that wrote something else into it, would not.

    launch(q, k, v, do, residual) -> (dq, dk) from one backend's launchers, with or without it.
    """
    gen = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn((2, 64, 1, 64), dtype=torch.float64, generator=gen) + offset
                   for offset in (0.0, 4.0, 10.0, 0.0))
    q, k, v, do = (t.to(device=device, dtype=torch.float16) for t in (q, k, v, do))
    ref = ref_with_grads(q, k, v, do, None, 0.0, None, None, torch.float64)
    errors = {residual: [(ours.double() - r).abs().max().item() for ours, r in zip(launch(q, k, v, do, residual),
                                                                                  ref[1:3])]
              for residual in (False, True)}
    for name, without, with_residual in zip(("dq", "dk"), errors[False], errors[True]):
        # seeds 0-3 measured (Triton interpreter): dq 4.0-5.2x closer, dk 2.8-6.8x
        assert with_residual * 2 < without, f"{name}: {with_residual:.3g} with the residual, {without:.3g} without"


def pack(x, lens):
    """(B, S, ...) -> (sum(lens), ...): the first lens[b] rows of each sequence."""
    return torch.cat([x[b, :n] for b, n in enumerate(lens)], dim=0)


def check_compiled_fullgraph(backend, dropout_p):
    """attention() under torch.compile(fullgraph=True) on `backend` equals eager attention()
    on the same backend: the same kernels with the same seed, up to fusion of the * 2."""
    gen = torch.Generator().manual_seed(43)
    q, k, v = qkv((2, 128, 4, 64), torch.float16, gen)
    mask = key_mask("lengths", 2, 128, gen)

    def f(q, k, v, mask):
        return attention(q, k, v, mask, dropout_p=dropout_p, seed=9 if dropout_p else None) * 2.0

    torch._dynamo.reset()
    with use_backend(backend):
        compiled = torch.compile(f, fullgraph=True)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = compiled(*leaves, mask)
        out.float().sum().backward()
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        out_ref = f(*ref, mask)
        out_ref.float().sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-3, atol=1e-3)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3)

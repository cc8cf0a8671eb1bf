"""Flash attention, "cuda" backend (csrc/attention*.cu through fastbert._C).

GPU tests (`pytest -m gpu`) run the compiled kernels against the float64
reference `attention_ref` under the house rule
    max|ours - ref64| <= 2 * max|baseline - ref64| + floor(dtype)
with two baselines: the reference run in the test dtype, and the Triton backend
(same dropout mask: both backends use the same Philox stream). Outputs are
poisoned (NaN) before the kernels run, inside NaN guard zones that must stay NaN.

Without a GPU:
  * the extension's bindings exist and fail with a clear RuntimeError;
  * the C++ Philox stream (computed on the host) equals the Triton backend's;
  * the same kernels, compiled with g++ against a CPU emulation of the GPU's warp
    primitives (tests/cuda_emu: ldmatrix, mma.sync, shfl, cp.async, barriers, with
    shared-memory race and bounds checks), run the forward/backward checks on small
    sizes (marked slow; skipped where g++, the CUDA headers or pybind11 are missing).
"""
import hashlib
import importlib
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from attention_cases import (assert_residual_sharpens_delta, check_compiled_fullgraph, check_out_residual, key_mask,
                             pack, philox7, qkv, ref_with_grads)
from conftest import DEVICE, FLOOR, ON_GPU, assert_close_to_ref, poison

from fastbert.ops import use_backend
from fastbert.ops.attention import attention, attention_ref, attention_varlen, attention_varlen_ref

A = importlib.import_module("fastbert.ops.attention")  # the module (fastbert.ops exports the function)
ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emu"


def _compiled_extension():
    try:
        from fastbert import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "attention_fwd") else None


# ---------------------------------------------------------------------------
# Helpers shared by the GPU and the emulated runs
# ---------------------------------------------------------------------------

class Guarded:
    """NaN-filled buffers with NaN guard zones around them: an unwritten element
    stays NaN, and a write outside the tensor shows up in a guard zone."""

    PAD = 64  # elements each side (keeps 16-byte alignment for 2- and 4-byte types)

    def __init__(self):
        self.buffers = []

    def empty(self, shape, dtype, device):
        n = math.prod(shape)
        buf = poison(torch.empty(n + 2 * self.PAD, dtype=dtype, device=device))
        self.buffers.append((buf, n))
        return buf[self.PAD:self.PAD + n].view(shape)

    def check(self):
        for buf, n in self.buffers:
            guards = torch.cat([buf[:self.PAD], buf[self.PAD + n:]])
            assert torch.isnan(guards.float()).all(), "a kernel wrote outside its output tensor"


def _launch(q, k, v, do, mask, dropout_p, scale, seed, cu=None, max_seqlen=None, residual=True):
    """(out, lse, dq, dk, dv) from the cuda launchers, outputs poisoned and guarded; residual:
    pass out's rounding residual from the forward to the backward, as AttentionFunction does
    when training (False: FlashAttention-2's D_i from the rounded out)."""
    g = Guarded()
    if cu is None:
        B, S, H, _ = q.shape
        lse_shape = (B, H, S)
    else:
        lse_shape = (q.shape[1], q.shape[0])
    out = g.empty(q.shape, q.dtype, q.device)
    out_residual = g.empty(q.shape, q.dtype, q.device) if residual else None
    lse = g.empty(lse_shape, torch.float32, q.device)
    A.cuda_attention_fwd(q, k, v, mask, cu, max_seqlen, dropout_p, scale, seed, out=out, lse=lse,
                         out_residual=out_residual)
    if residual:
        check_out_residual(out, out_residual)
    dq, dk, dv = (g.empty(t.shape, t.dtype, t.device) for t in (q, k, v))
    A.cuda_attention_bwd(do, q, k, v, out, lse, mask, cu, max_seqlen, dropout_p, scale, seed, dq=dq, dk=dk, dv=dv,
                         out_residual=out_residual)
    g.check()
    return out, lse, dq, dk, dv


def _check_lse(lse, q, k, mask, scale):
    s = math.sqrt(q.shape[-1]) if scale is None else 1.0 / scale
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / s
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse_ref = torch.logsumexp(scores, dim=-1)                   # (B, H, S)
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse.double()[finite], lse_ref[finite], rtol=0,
                               atol=1e-4 * lse_ref.abs().max().item() + 1e-5)
    assert torch.all(lse[~finite] == float("inf")), "rows with no real key must store lse = +inf"


def _check_all(q, k, v, mask, dropout_p=0.0, scale=None, seed=0, triton=False):
    """cuda kernels vs the float64 reference (same dropout mask), forward and every gradient.

    triton=True also holds them to 2x the Triton backend's error (GPU only).
    """
    dtype, B, S, H = q.dtype, q.shape[0], q.shape[1], q.shape[2]
    gen = torch.Generator().manual_seed(1234)
    do = torch.randn(q.shape, dtype=torch.float64, generator=gen).to(device=q.device, dtype=dtype)
    keep = A.cuda_attention_dropout_mask(B, H, S, dropout_p, seed, q.device) if dropout_p > 0 else None
    out, lse, dq, dk, dv = _launch(q, k, v, do, mask, dropout_p, scale, seed)
    ref = ref_with_grads(q, k, v, do, mask, dropout_p, scale, keep, torch.float64)
    base = ref_with_grads(q, k, v, do, mask, dropout_p, scale, keep, dtype)
    for name, ours, r, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, base):
        assert_close_to_ref(ours, r, b, name)
    _check_lse(lse, q, k, mask, scale)
    if triton:
        from fastbert.kernels import attention as tk
        tri_res = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        tri_out, tri_lse = tk.attention_fwd(q, k, v, mask, None, None, dropout_p, scale, seed, out_residual=tri_res)
        tri_grads = tk.attention_bwd(do, q, k, v, tri_out, tri_lse, mask, None, None, dropout_p, scale, seed,
                                     out_residual=tri_res)
        for name, ours, r, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, (tri_out, *tri_grads)):
            assert_close_to_ref(ours, r, b, f"{name} vs triton")
    return out, lse, dq, dk, dv


def _varlen_vs_padded(dtype, dropout_p, device, lens=(5, 0, 40, 17, 1), D=32):
    """Packed launch == padded launch of the same sequences (same kernels, same mask), and
    both match the float64 varlen reference."""
    gen = torch.Generator().manual_seed(5)
    B, S, H = len(lens), max(lens), 2
    q, k, v = qkv((B, S, H, D), dtype, gen, device)
    mask = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).to(device)
    do = torch.randn((B, S, H, D), generator=gen).to(device=device, dtype=dtype)
    do = do * mask[:, :, None, None]                      # padded query rows carry no gradient
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    pad = _launch(q, k, v, do, mask, dropout_p, None, 21)
    packed = [pack(t, lens) for t in (q, k, v, do)]
    var = _launch(*packed, None, dropout_p, None, 21, cu=cu, max_seqlen=S)
    tol = dict(rtol=0, atol=FLOOR[dtype])
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        torch.testing.assert_close(var[i], pack(pad[i], lens), **tol, msg=f"varlen {name} != padded")
    keep = A.cuda_attention_dropout_mask(B, H, S, dropout_p, 21, device) if dropout_p > 0 else None
    leaves64 = [t.detach().double().requires_grad_() for t in packed[:3]]
    leaves_lo = [t.detach().clone().requires_grad_() for t in packed[:3]]
    ref = attention_varlen_ref(*leaves64, cu, dropout_p, None, keep)
    base = attention_varlen_ref(*leaves_lo, cu, dropout_p, None, keep)
    g_ref = torch.autograd.grad(ref, leaves64, packed[3].double())
    g_base = torch.autograd.grad(base, leaves_lo, packed[3])
    assert_close_to_ref(var[0], ref, base, "varlen out")
    for name, ours, r, b in zip(("dq", "dk", "dv"), var[2:], g_ref, g_base):
        assert_close_to_ref(ours, r, b, f"varlen {name}")
    assert not torch.isnan(var[1]).any(), "varlen lse"


def _fully_masked(device, dtype=torch.float16):
    """A sequence whose keys are all masked: zero output and gradients, lse = +inf."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv((2, 21, 2, 32), dtype, gen, device)
    mask = torch.ones(2, 21, dtype=torch.bool, device=device)
    mask[1] = False
    do = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    out, lse, dq, dk, dv = _launch(q, k, v, do, mask, 0.0, None, 0)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), name
        assert torch.all(t[1] == 0), name
    assert torch.all(lse[1] == float("inf"))


# Forward and backward cases: (batch, seqlen, heads, head_dim, dtype, mask kind)
GPU_CASES = [
    (1, 1, 1, 32, torch.float16, None),            # seqlen 1
    (2, 7, 2, 64, torch.bfloat16, "lengths"),      # shorter than one block
    (2, 129, 2, 64, torch.float16, "random"),      # one past a block edge, holes, an empty row
    (3, 129, 2, 128, torch.bfloat16, "lengths"),   # mixed lengths, largest head dim
    (1, 512, 2, 64, torch.float16, None),          # BERT's longest, every block full
    (2, 512, 3, 32, torch.bfloat16, "random"),
    (2, 96, 2, 128, torch.float16, "random"),      # block-aligned keys, D = 128 (32-key dQ steps)
    (2, 40, 2, 32, torch.bfloat16, None),
    (4, 384, 4, 128, torch.float16, "lengths"),
]
EMU_CASES = [
    (1, 1, 1, 32, torch.float16, None),
    (2, 7, 2, 64, torch.float16, "lengths"),
    (1, 129, 1, 64, torch.bfloat16, "random"),
    (1, 97, 1, 128, torch.float16, "random"),
    (2, 33, 1, 128, torch.bfloat16, "lengths"),
    (1, 65, 2, 32, torch.bfloat16, None),
]


def _case_id(c):
    return f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{str(c[4])[6:]}-{c[5]}"


# ---------------------------------------------------------------------------
# CPU: validation, bindings, Philox stream
# ---------------------------------------------------------------------------

def test_float32_raises_clear_error():
    q = torch.randn(2, 8, 2, 32)
    with pytest.raises(NotImplementedError, match="float16 and bfloat16 kernels only.*'triton' or 'torch' backend"):
        A._check_cuda(q, q, q, "attention")


def test_bad_inputs_cpu_checks():
    q = torch.randn(2, 8, 2, 48, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"head_dim = 48 is not supported by the 'cuda' backend.*\(32, 64, 128\)"):
        A._check_cuda(q, q, q, "attention")
    with pytest.raises(TypeError, match="takes float16 or bfloat16, got torch.float64"):
        A._check_cuda(q.double(), q.double(), q.double(), "attention")
    qt = torch.randn(2, 8, 32, 2, dtype=torch.float16).transpose(2, 3)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        A._check_cuda(qt, qt.contiguous(), qt.contiguous(), "attention")


def test_grid_limits_are_checked_in_python():
    """Sequence blocks stand on grid axis y (65,535 blocks of 64 rows) and batch x heads on x: past
    either the extension raised a RuntimeError, which "auto" did not fall back from (a packed batch
    with max_seqlen given as the total token count of a few million); now "auto" takes triton and a
    named "cuda" raises a ValueError that says which limit."""
    packed = torch.empty(8, 2, 64, dtype=torch.float16)
    assert A.CUDA_MAX_SEQLEN == 4_194_240
    assert A._cuda_supports(packed, packed, packed, 4_194_240, 2)
    assert not A._cuda_supports(packed, packed, packed, 4_194_241, 2)
    with pytest.raises(ValueError, match=r"attention_varlen: max_seqlen = 4194241 is more than the 'cuda' "
                                         r"backend's grid takes \(4194240\); use the 'triton' backend"):
        A._check_cuda(packed, packed, packed, "attention_varlen", 4_194_241, 2)
    wide = torch.empty(1, 1, 1, 64, dtype=torch.float16).expand(2**30, 4, 3, 64)    # no memory behind it
    assert A._cuda_batch_heads(wide) == 3 * 2**30
    assert not A._cuda_supports(wide, wide, wide, 4, 3 * 2**30)
    with pytest.raises(ValueError, match=r"attention: batch x heads = 3221225472 is more than"):
        A._check_cuda(wide, wide, wide, "attention", 4, 3 * 2**30)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert A._cuda_batch_heads(packed, cu) == 4


def test_auto_backend_falls_back_for_unsupported_inputs():
    """Under "auto", inputs the CUDA kernels cannot take go to the next backend; asked for by
    name, "cuda" stays and its checks raise the clear error."""
    assert A._cuda_supports(*[torch.empty(1, 4, 2, 64, dtype=torch.float16)] * 3)
    assert not A._cuda_supports(*[torch.empty(1, 4, 2, 64)] * 3)                       # float32
    assert not A._cuda_supports(*[torch.empty(1, 4, 2, 48, dtype=torch.bfloat16)] * 3)  # head dim
    assert A._cuda_fallback("auto", torch.device("cuda")) == "triton"
    assert A._cuda_fallback("cuda", torch.device("cuda")) == "cuda"


def test_extension_bindings_and_no_gpu_error():
    ext = _compiled_extension()
    if ext is None:
        pytest.skip("fastbert._C is not built (FASTBERT_CUDA=1 pip install -e .)")
    for name in ("attention_fwd", "attention_bwd", "attention_dropout_mask", "attention_dropout_mask_host"):
        assert callable(getattr(ext, name)), name
        assert getattr(ext, name).__doc__
    if torch.cuda.is_available():
        return
    # No GPU: the launcher fails with the CUDA error text, it does not crash. 16-byte aligned
    # dummy addresses pass the argument checks and never get dereferenced.
    t4 = (1 << 20, 0, 64, 32)
    with pytest.raises(RuntimeError, match="fastbert._C:.*(cudaErrorNoDevice|cudaErrorInsufficientDriver|"
                                           "no usable CUDA GPU|CUDA)"):
        ext.attention_fwd(q=t4, k=t4, v=t4, out=t4, out_residual=(0, 0, 0, 0), lse=(1 << 20, 0, 1), mask=(0, 0, 0),
                          cu_seqlens=0, seed_ptr=0,
                          batch=1, heads=1, seqlen=4, head_dim=32, dtype=1, softmax_scale=0.1, dropout_p=0.0,
                          dropout_threshold=0, seed=0, stream=0)
    with pytest.raises(ValueError, match="float16 or bfloat16, got float32"):
        ext.attention_fwd(q=t4, k=t4, v=t4, out=t4, out_residual=(0, 0, 0, 0), lse=(1 << 20, 0, 1), mask=(0, 0, 0),
                          cu_seqlens=0, seed_ptr=0,
                          batch=1, heads=1, seqlen=4, head_dim=32, dtype=0, softmax_scale=0.1, dropout_p=0.0,
                          dropout_threshold=0, seed=0, stream=0)
    with pytest.raises(ValueError, match="out_residual must have out's strides"):
        ext.attention_fwd(q=t4, k=t4, v=t4, out=t4, out_residual=(1 << 21, 0, 32, 32), lse=(1 << 20, 0, 1),
                          mask=(0, 0, 0), cu_seqlens=0, seed_ptr=0, batch=1, heads=1, seqlen=4, head_dim=32, dtype=1,
                          softmax_scale=0.1, dropout_p=0.0, dropout_threshold=0, seed=0, stream=0)


# ---------------------------------------------------------------------------
# The CPU emulation of the kernels (tests/cuda_emu)
# ---------------------------------------------------------------------------

def _build_emulator():
    """Compile tests/cuda_emu/attention_emu.cpp + csrc/attention_bind.cpp with g++ into a
    cached module (about 20 s once per source change); None if a tool is missing."""
    cxx = shutil.which("g++")
    cuda_inc = next((p for p in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", "/usr")
                     if p and (Path(p) / "include" / "cuda_fp16.h").exists()), None)
    try:
        import pybind11
    except ImportError:
        return None
    if cxx is None or cuda_inc is None:
        return None
    sources = sorted(EMU_DIR.glob("*.[ch]*")) + sorted((ROOT / "csrc").glob("attention*.[ch]*")) + \
        [ROOT / "csrc" / "fastbert.h"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"fastbert_attention_emu_{digest}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"_attention_emu{suffix}"
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-w",
               f"-I{ROOT / 'csrc'}", f"-I{EMU_DIR}", f"-I{Path(cuda_inc) / 'include'}",
               f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
               '-DFASTBERT_ATTN_EMULATE="emu_attention_primitives.h"',
               str(EMU_DIR / "attention_emu.cpp"), str(ROOT / "csrc" / "attention_bind.cpp"),
               "-o", str(out_dir / f"tmp{os.getpid()}{suffix}")]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out_dir / f"tmp{os.getpid()}{suffix}", target)
    sys.path.insert(0, str(out_dir))
    try:
        return importlib.import_module("_attention_emu")
    finally:
        sys.path.remove(str(out_dir))


@pytest.fixture(scope="module")
def emulator():
    try:
        mod = _build_emulator()
    except subprocess.CalledProcessError as err:
        pytest.fail(f"building the attention emulator failed:\n{err.stderr[-4000:]}")
    if mod is None:
        pytest.skip("g++, the CUDA headers or pybind11 are missing: no CPU emulation of the kernels")
    return mod


@pytest.fixture
def emu(emulator, monkeypatch):
    """Route the cuda launchers to the emulated kernels (CPU tensors)."""
    monkeypatch.setattr(A, "_cuda_ext", lambda: emulator)
    return emulator


def test_dropout_stream_matches_triton(emulator, monkeypatch):
    """The C++ Philox keep-mask (host code, same function the kernels call) == the Triton backend's."""
    ext = _compiled_extension() or emulator
    monkeypatch.setattr(A, "_cuda_ext", lambda: ext)
    from fastbert.kernels.attention import attention_dropout_mask
    for B, H, S, p, seed in ((2, 3, 37, 0.3, 1234567), (1, 2, 64, 0.1, 5), (3, 1, 9, 0.5, 2**31 - 2)):
        ours = A.cuda_attention_dropout_mask(B, H, S, p, seed, "cpu")
        theirs = attention_dropout_mask(B, H, S, p, seed, "cpu" if not ON_GPU else DEVICE).cpu()
        assert torch.equal(ours, theirs), (B, H, S, p, seed)


@pytest.mark.slow
@pytest.mark.parametrize("B,S,H,D,dtype,mask_kind", EMU_CASES, ids=[_case_id(c) for c in EMU_CASES])
def test_emulated_forward_backward(emu, B, S, H, D, dtype, mask_kind):
    gen = torch.Generator().manual_seed(B * 1000 + S * 10 + D)
    q, k, v = qkv((B, S, H, D), dtype, gen, "cpu")
    _check_all(q, k, v, key_mask(mask_kind, B, S, gen, "cpu"))


@pytest.mark.slow
def test_emulated_trailing_padding_across_blocks(emu):
    """Rows padded past whole 64-key blocks (the forward and dQ loops stop at the last real key)
    and a fully padded row, with dropout, against the float64 reference."""
    gen = torch.Generator().manual_seed(151)
    q, k, v = qkv((4, 150, 1, 64), torch.float16, gen, "cpu")
    mask = torch.arange(150)[None, :] < torch.tensor([150, 40, 70, 0])[:, None]
    _check_all(q, k, v, mask, dropout_p=0.2, seed=5)


@pytest.mark.slow
def test_emulated_dropout_and_strided_inputs(emu):
    """Dropout against the reference with the kernels' own mask; q, k, v views of one fused
    (B, S, H, 3, D) projection; a custom scale; the seed read from a tensor (compiled path)."""
    gen = torch.Generator().manual_seed(17)
    qkv = torch.randn((2, 70, 2, 3, 64), dtype=torch.float64, generator=gen).to(torch.float16)
    q, k, v = qkv.unbind(dim=3)
    assert not q.is_contiguous()
    mask = key_mask("random", 2, 70, gen, "cpu")
    out, _, dq, dk, dv = _check_all(q, k, v, mask, dropout_p=0.3, scale=0.11, seed=1234567)
    seed_t = torch.tensor([1234567], dtype=torch.int64)
    do = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1234)).half()
    again = _launch(q, k, v, do, mask, 0.3, 0.11, seed_t)
    for a, b in zip((out, dq, dk, dv), (again[0], *again[2:])):
        assert torch.equal(a, b), "a tensor seed must give the same mask as the int seed"


@pytest.mark.slow
def test_emulated_each_operand_keeps_its_own_layout(emu):
    """Every operand read, and every output written, with its own strides: k and dk one slot of
    fused (B, S, H, 2, D) buffers, dO head-major ((B, H, S, D) transposed), q, v, out, dq, dv
    contiguous, and a key mask with a non-unit stride (every other byte of a wider mask). A kernel
    that steps one tensor with another's strides (v with k's, out with dO's, dk with dv's), or the
    mask with a unit stride (key_valid, key_end, any_real_key), reads or writes the wrong rows."""
    gen = torch.Generator().manual_seed(23)
    B, S, H, D, dtype = 2, 70, 2, 32, torch.float16
    q, v, do = qkv((B, S, H, D), dtype, gen, "cpu")
    k = torch.randn((B, S, H, 2, D), dtype=torch.float64, generator=gen).to(dtype)[..., 0, :]
    do = do.transpose(1, 2).contiguous().transpose(1, 2)
    # row 0 with holes (random bytes between), row 1 left-padded past S / 2 (zeros between): a
    # last-key scan or a block's any-real-key test that ignores the stride finds no real key there
    wide = torch.rand(B, 2 * S, generator=gen) > 0.4
    wide[0, 0] = True
    wide[1] = False
    wide[1, ::2] = torch.arange(S) >= 40
    mask = wide[:, ::2]
    assert mask.stride() == (2 * S, 2) and k.stride()[1] == 2 * H * D and do.stride()[1] == D
    g = Guarded()
    out, out_residual = g.empty(q.shape, dtype, "cpu"), g.empty(q.shape, dtype, "cpu")
    lse = g.empty((B, H, S), torch.float32, "cpu")
    A.cuda_attention_fwd(q, k, v, mask, out=out, lse=lse, out_residual=out_residual)
    dk_buf = g.empty((B, S, H, 2, D), dtype, "cpu")
    dq, dk, dv = g.empty(q.shape, dtype, "cpu"), dk_buf[..., 0, :], g.empty(v.shape, dtype, "cpu")
    got = A.cuda_attention_bwd(do, q, k, v, out, lse, mask, dq=dq, dk=dk, dv=dv, out_residual=out_residual)
    assert all(a is b for a, b in zip(got, (dq, dk, dv))), "the launcher must fill the given outputs"
    g.check()
    assert torch.isnan(dk_buf[..., 1, :]).all(), "dk written outside its slot of the fused buffer"
    ref = ref_with_grads(q, k, v, do, mask, 0.0, None, None, torch.float64)
    base = ref_with_grads(q, k, v, do, mask, 0.0, None, None, dtype)
    for name, ours, r, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, base):
        assert_close_to_ref(ours, r, b, name)
    _check_lse(lse, q, k, mask, None)


@pytest.mark.slow
def test_emulated_left_padding(emu):
    """Left-padded rows (the real keys at the end): the forward and dQ key loops run to the row's
    end, and a key block whose only real key is its last (key 127 of row 1, key 63 of row 2)
    still gets its dK and dV (the dK/dV kernel skips only blocks without a real key)."""
    gen = torch.Generator().manual_seed(29)
    q, k, v = qkv((4, 130, 1, 32), torch.float16, gen, "cpu")
    mask = torch.arange(130)[None, :] >= torch.tensor([0, 127, 63, 129])[:, None]
    _check_all(q, k, v, mask)


@pytest.mark.slow
def test_emulated_dropout_keeps_at_the_threshold(emu):
    """A probability whose Philox word >> 1 equals the threshold round(p 2^31) is kept (word >> 1 >=
    threshold, as in the Triton kernels). p is set to each key's word of one Philox call in turn
    (keys 0..3 of query 3: words w0, w2, w1, w3): the keep-mask keeps that key and equals Triton's,
    and the kernels (which draw the same words two keys at a time) match the reference with it."""
    from fastbert.kernels.attention import attention_dropout_mask
    seed, i, S = 77, 3, 8
    w0, w1, w2, w3 = philox7(seed, 0, i, 0, 0)
    gen = torch.Generator().manual_seed(31)
    q, k, v = qkv((1, S, 1, 32), torch.float16, gen, "cpu")
    for j, word in enumerate((w0, w2, w1, w3)):
        p = (word >> 1) / 2.0**31
        assert 0.0 < p < 1.0
        keep = A.cuda_attention_dropout_mask(1, 1, S, p, seed, "cpu")
        assert keep[0, 0, i, j], f"key {j}: word >> 1 == threshold must be kept"
        assert not keep.all(), "p must drop something"
        assert torch.equal(keep, attention_dropout_mask(1, 1, S, p, seed, "cpu")), f"key {j}: != Triton's mask"
        _check_all(q, k, v, None, dropout_p=p, seed=seed)
        # p 2^31 = word >> 1 + 0.6 rounds up past the word: that key is dropped (a threshold
        # truncated instead of rounded would keep it, and the mask would differ from Triton's)
        p = ((word >> 1) + 0.6) / 2.0**31
        keep = attention_dropout_mask(1, 1, S, p, seed, "cpu")
        assert not keep[0, 0, i, j], f"key {j}: word >> 1 == threshold - 1 must be dropped"
        assert torch.equal(A.cuda_attention_dropout_mask(1, 1, S, p, seed, "cpu"), keep), f"key {j}: != Triton's mask"
        _check_all(q, k, v, None, dropout_p=p, seed=seed)


@pytest.mark.slow
def test_emulated_backward_takes_delta_from_the_residual(emu):
    """attention_cases.assert_residual_sharpens_delta on the CUDA launchers (emulated)."""
    assert_residual_sharpens_delta(
        lambda q, k, v, do, residual: _launch(q, k, v, do, None, 0.0, None, 0, residual=residual)[2:4], "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_emulated_backward_reads_the_residual_of_its_own_rows(emu, layout):
    """tests/test_attention.py's check of where each row's residual is read, on the CUDA kernels:
    out_residual = out gives the backward of 2 out (here up to the fp32 order of D_i's sum:
    (D + a) + a against D + 2a), on several heads with a mask and dropout, or packed sequences."""
    gen = torch.Generator().manual_seed(12)
    lens = [5, 33, 18]
    shape = (2, 37, 3, 32) if layout == "padded" else (sum(lens), 3, 32)
    q, k, v, do = qkv(shape, torch.float16, gen, "cpu") + qkv(shape, torch.float16, gen, "cpu")[:1]
    if layout == "padded":
        mask, cu, max_seqlen, dropout_p = key_mask("lengths", 2, 37, gen, "cpu"), None, None, 0.2
    else:
        mask, max_seqlen, dropout_p = None, max(lens), 0.0
        cu = torch.tensor([0, 5, 38, 56], dtype=torch.int32)
    out, lse = A.cuda_attention_fwd(q, k, v, mask, cu, max_seqlen, dropout_p, None, 7)
    args = (mask, cu, max_seqlen, dropout_p, None, 7)
    doubled = A.cuda_attention_bwd(do, q, k, v, 2 * out, lse, *args)
    residual = A.cuda_attention_bwd(do, q, k, v, out, lse, *args, out_residual=out.clone())
    plain = A.cuda_attention_bwd(do, q, k, v, out, lse, *args)
    for name, a, b, c in zip(("dq", "dk"), residual, doubled, plain):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3, msg=f"{name}: the residual was not read where out was")
        assert not torch.allclose(a, c, rtol=1e-2, atol=1e-3), name  # the check can fail


@pytest.mark.slow
def test_emulated_unaligned_output_copies_its_residual(emu):
    """A backward given an unaligned out copies it, and out's residual with it (both must share
    strides); a residual laid out otherwise is refused by name."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = qkv((1, 20, 2, 32), torch.float16, gen, "cpu")
    do = torch.randn(q.shape, generator=gen).half()
    out, lse, dq, dk, dv = _launch(q, k, v, do, None, 0.0, None, 0)
    out_residual = torch.empty_like(out)
    A.cuda_attention_fwd(q, k, v, out_residual=out_residual)

    def unaligned(t):
        storage = torch.empty(t.numel() + 3, dtype=t.dtype)
        view = storage[3:].view(t.shape)                   # 6-byte offset
        view.copy_(t)
        return view
    again = A.cuda_attention_bwd(do, q, k, v, unaligned(out), lse, out_residual=unaligned(out_residual))
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), again):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="out_residual must be"):
        A.cuda_attention_bwd(do, q, k, v, out, lse, out_residual=out_residual.float())
    with pytest.raises(ValueError, match="out_residual must have out's strides"):
        A.cuda_attention_fwd(q, k, v, out_residual=torch.empty(1, 2, 20, 32, dtype=torch.float16).transpose(1, 2))


@pytest.mark.slow
def test_emulated_unaligned_input_is_copied(emu):
    """An input whose rows break 16-byte alignment is copied by the launcher, not misread."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(1 * 20 * 2 * 32 + 3, dtype=torch.float64, generator=gen).half()
    q = base[3:].view(1, 20, 2, 32)                        # 6-byte offset: unaligned
    _, k, v = qkv((1, 20, 2, 32), torch.float16, gen, "cpu")
    _check_all(q, k, v, None)


@pytest.mark.slow
def test_emulated_launchers_refuse_dropout_p_out_of_range(emu):
    """The launchers hand dropout_p to fastbert._C unchecked (attention() checks it first); the
    binding refuses p outside [0, 1) before any kernel runs (p = 1 would scale by 1 / 0)."""
    q, k, v = qkv((1, 8, 1, 32), torch.float16, torch.Generator().manual_seed(2), "cpu")
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"attention: dropout_p must be in \[0, 1\)"):
            A.cuda_attention_fwd(q, k, v, dropout_p=p, seed=1)


@pytest.mark.slow
def test_emulated_fully_masked_rows(emu):
    _fully_masked("cpu")


@pytest.mark.slow
@pytest.mark.parametrize("dtype,dropout_p", [(torch.float16, 0.0), (torch.bfloat16, 0.25)])
def test_emulated_varlen_matches_padded(emu, dtype, dropout_p):
    _varlen_vs_padded(dtype, dropout_p, "cpu")


@pytest.mark.slow
def test_emulated_autograd_function(emu):
    """AttentionFunction with the cuda launchers: the public path's gradients equal the launchers'."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = qkv((2, 30, 2, 64), torch.float16, gen, "cpu")
    mask = key_mask("random", 2, 30, gen, "cpu")
    do = torch.randn(q.shape, generator=gen).half()
    out, _, dq, dk, dv = _launch(q, k, v, do, mask, 0.2, 0.11, 99)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out2 = A.AttentionFunction.apply(*leaves, mask, None, 30, 0.2, 0.11, 99, "cuda", True)
    out2.backward(do)
    assert torch.equal(out2.detach(), out)
    for ours, leaf in zip((dq, dk, dv), leaves):
        assert torch.equal(leaf.grad, ours)


@pytest.mark.slow
def test_emulated_warps_running_ahead_of_each_other_change_no_bit(emu, monkeypatch):
    """The emulation's round robin moves every warp one collective a pass, in step, so a missing
    block barrier between one warp's plain shared-memory writes (the dQ kernel's s_delta, the
    dK/dV kernel's s_lse2 and s_delta stages) and another warp's reads gave the right answer.
    FBEMU_SCHEDULE=greedy / greedy_desc lets one warp run as far ahead as the barriers allow:
    every output and gradient must be bitwise the round robin's. Forward, dQ and dK/dV kernels,
    each head dim, both dtypes, dropout, padding and a packed (varlen) launch."""
    gen = torch.Generator().manual_seed(31)
    cases = []
    for (B, S, H, D, dtype, mask_kind, p) in ((2, 70, 1, 32, torch.float16, "random", 0.2),
                                               (1, 129, 1, 64, torch.bfloat16, "lengths", 0.0),
                                               (1, 40, 1, 128, torch.float16, None, 0.1)):
        q, k, v = qkv((B, S, H, D), dtype, gen, "cpu")
        do = torch.randn(q.shape, generator=gen).to(dtype)
        cases.append(((q, k, v, do, key_mask(mask_kind, B, S, gen, "cpu"), p, None, 7), {}))
    lens = (5, 0, 40)
    q, k, v, do = (pack(t, lens) for t in (*qkv((3, 40, 2, 64), torch.float16, gen, "cpu"),
                                             torch.randn((3, 40, 2, 64), generator=gen).half()))
    cu = torch.tensor([0, 5, 5, 45], dtype=torch.int32)
    cases.append(((q, k, v, do, None, 0.0, None, 3), dict(cu=cu, max_seqlen=40)))

    def run():
        return [t for args, kw in cases for t in _launch(*args, **kw)]

    monkeypatch.delenv("FBEMU_SCHEDULE", raising=False)
    expected = run()
    for schedule in ("greedy", "greedy_desc"):
        monkeypatch.setenv("FBEMU_SCHEDULE", schedule)
        for n, (got, want) in enumerate(zip(run(), expected)):
            case, name = divmod(n, 5)
            assert torch.equal(got, want), \
                f"{schedule}: case {case} {('out', 'lse', 'dq', 'dk', 'dv')[name]} differs from the round robin's"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_residual_is_kept_for_a_16_bit_gradient(emu, monkeypatch, dtype):
    """The cuda backend takes bfloat16 (the interpreter cannot): a gradient of a bfloat16 attention,
    like a float16 one, asks the forward for out's rounding residual; inference does not."""
    seen = []
    launchers = A._LAUNCHERS["cuda"]
    real = launchers.attention_fwd
    monkeypatch.setattr(launchers, "attention_fwd", lambda *a: seen.append(a[9]) or real(*a))  # a[9]: residual
    monkeypatch.setattr(A, "resolve", lambda device: "cuda")
    gen = torch.Generator().manual_seed(3)
    leaves = [t.requires_grad_() for t in qkv((1, 8, 1, 32), dtype, gen, "cpu")]
    A.attention(*leaves)
    with torch.no_grad():
        A.attention(*leaves)
    assert seen == [True, False], (dtype, seen)


# ---------------------------------------------------------------------------
# GPU: the compiled kernels
# ---------------------------------------------------------------------------

@pytest.fixture
def cuda_ext():
    ext = _compiled_extension()
    if ext is None:
        pytest.skip("fastbert._C is not built with the attention kernels")
    return ext


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,H,D,dtype,mask_kind", GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
def test_gpu_forward_backward(cuda_ext, B, S, H, D, dtype, mask_kind):
    gen = torch.Generator().manual_seed(B * 1000 + S * 10 + D)
    q, k, v = qkv((B, S, H, D), dtype, gen, DEVICE)
    _check_all(q, k, v, key_mask(mask_kind, B, S, gen, DEVICE), triton=True)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_dropout_matches_reference_and_triton(cuda_ext, D, dtype):
    gen = torch.Generator().manual_seed(17)
    q, k, v = qkv((2, 200, 3, D), dtype, gen, DEVICE)
    mask = key_mask("random", 2, 200, gen, DEVICE)
    _check_all(q, k, v, mask, dropout_p=0.3, scale=0.1, seed=1234567, triton=True)
    from fastbert.kernels.attention import attention_dropout_mask
    assert torch.equal(A.cuda_attention_dropout_mask(2, 3, 200, 0.3, 1234567, DEVICE),
                       attention_dropout_mask(2, 3, 200, 0.3, 1234567, DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 64, 128])
def test_gpu_trailing_padding_across_blocks(cuda_ext, D):
    """Rows padded past whole key blocks (the forward and dQ loops stop at each row's last real
    key; dK/dV skip blocks of padding keys) and a fully padded row, with dropout, against the
    float64 reference and the Triton kernels."""
    gen = torch.Generator().manual_seed(151)
    q, k, v = qkv((4, 300, 2, D), torch.bfloat16, gen, DEVICE)
    mask = (torch.arange(300)[None, :] < torch.tensor([300, 40, 130, 0])[:, None]).to(DEVICE)
    _check_all(q, k, v, mask, dropout_p=0.2, seed=5, triton=True)


@pytest.mark.gpu
def test_gpu_strided_inputs_and_tensor_seed(cuda_ext):
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn((2, 145, 4, 3, 64), dtype=torch.float64, generator=gen).to(DEVICE, torch.bfloat16)
    q, k, v = qkv.unbind(dim=3)
    mask = key_mask("lengths", 2, 145, gen, DEVICE)
    out, _, dq, dk, dv = _check_all(q, k, v, mask, dropout_p=0.1, scale=0.3, seed=42, triton=True)
    do = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1234)).to(DEVICE, q.dtype)
    again = _launch(q, k, v, do, mask, 0.1, 0.3, torch.tensor([42], dtype=torch.int64, device=DEVICE))
    for a, b in zip((out, dq, dk, dv), (again[0], *again[2:])):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_fully_masked_rows(cuda_ext):
    _fully_masked(DEVICE, torch.float16)
    _fully_masked(DEVICE, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,dropout_p", [(torch.float16, 0.0), (torch.bfloat16, 0.25)])
def test_gpu_varlen_matches_padded(cuda_ext, dtype, dropout_p):
    _varlen_vs_padded(dtype, dropout_p, DEVICE, lens=(5, 0, 40, 17, 1, 300, 129), D=64)


@pytest.mark.gpu
def test_gpu_dropout_reproducible_and_kept_fraction(cuda_ext):
    gen = torch.Generator().manual_seed(19)
    q, k, v = qkv((1, 40, 2, 32), torch.float16, gen, DEVICE)
    with use_backend("cuda"):
        a = attention(q, k, v, dropout_p=0.5, seed=5)
        b = attention(q, k, v, dropout_p=0.5, seed=5)
        c = attention(q, k, v, dropout_p=0.5, seed=6)
        torch.manual_seed(0)
        d = attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(0)
        e = attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and torch.equal(d, e)
    assert not torch.equal(a, c)
    for p in (0.1, 0.5):
        keep = A.cuda_attention_dropout_mask(2, 3, 128, p, 2024, DEVICE).cpu()
        for part in [keep] + [keep[..., r::4] for r in range(4)]:
            n = part.numel()
            assert abs(part.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.gpu
def test_gpu_public_functions(cuda_ext):
    """attention() / attention_varlen() on the cuda backend: the same kernels through AttentionFunction."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = qkv((2, 130, 2, 64), torch.float16, gen, DEVICE)
    mask = key_mask("random", 2, 130, gen, DEVICE)
    do = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=q.dtype)
    out, _, dq, dk, dv = _launch(q, k, v, do, mask, 0.2, 0.11, 99)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend("cuda"):
        out2 = attention(*leaves, mask=mask, dropout_p=0.2, softmax_scale=0.11, seed=99)
    out2.backward(do)
    assert torch.equal(out2.detach(), out)
    for ours, leaf in zip((dq, dk, dv), leaves):
        assert torch.equal(leaf.grad, ours)
    cu = torch.tensor([0, 50, 130], dtype=torch.int32, device=DEVICE)
    packed = q[0]                                           # (130, H, D) as 2 packed sequences
    with use_backend("cuda"):
        out_v = attention_varlen(packed, k[0], v[0], cu, 80)
    ref = attention_varlen_ref(packed.double(), k[0].double(), v[0].double(), cu)
    base = attention_varlen_ref(packed, k[0], v[0], cu)
    assert_close_to_ref(out_v, ref, base, "varlen out")


@pytest.mark.gpu
def test_gpu_bad_inputs(cuda_ext):
    q = torch.randn(2, 8, 2, 32, device=DEVICE)
    with use_backend("cuda"):
        with pytest.raises(NotImplementedError, match="'triton' or 'torch' backend for float32"):
            attention(q, q, q)
        with pytest.raises(NotImplementedError, match="'triton' or 'torch' backend for float32"):
            attention_varlen(q[0], q[0], q[0], torch.tensor([0, 8], dtype=torch.int32, device=DEVICE), 8)
        h = torch.randn(2, 8, 2, 48, device=DEVICE, dtype=torch.float16)
        with pytest.raises(ValueError, match="head_dim = 48 is not supported by the 'cuda' backend"):
            attention(h, h, h)


@pytest.mark.gpu
def test_gpu_auto_backend_float32_uses_triton(cuda_ext):
    """The default backend prefers cuda, but float32 (no CUDA kernel) still runs, on Triton."""
    gen = torch.Generator().manual_seed(47)
    q, k, v = qkv((2, 50, 2, 64), torch.float32, gen, DEVICE)
    out = attention(q, k, v)
    ref = attention_ref(q.double(), k.double(), v.double())
    assert_close_to_ref(out, ref, attention_ref(q, k, v), "auto float32")


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_compile_fullgraph(cuda_ext, dropout_p):
    check_compiled_fullgraph("cuda", dropout_p)

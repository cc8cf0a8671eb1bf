"""Flash attention in Triton: bidirectional, key padding mask or packed (varlen)
sequences, dropout on the probabilities, forward and FlashAttention-2 backward.

Forward (one program = BLOCK_M query rows of one (batch, head)).
    s_ij = scale * q_i . k_j                 (-inf for masked or out-of-range keys)
    p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
    o_i  = sum_j p_ij z_ij v_j,  z_ij = keep_ij / (1 - dropout_p)
The S x S matrix is never stored: the program walks the keys in blocks of
BLOCK_N and keeps a running max m_i, a running sum l_i = sum_j exp(s_ij - m_i)
and an accumulator acc_i = sum_j exp(s_ij - m_i) z_ij v_j. When a block raises
the max to m', the old terms are rescaled by alpha = exp(m_i - m'). At the end
o_i = acc_i / l_i and lse_i = m_i + log l_i, saved in fp32 for the backward.
Exponentials are taken base 2 (exp2(x * log2 e) = exp(x)), the scale folded
into the same multiply. Dropout does not touch l_i: it drops terms of acc only.
A row whose keys are all masked has l_i = 0: its output is 0 and its lse is
stored as +inf, so that the backward's exp(s_ij - lse_i) is exactly 0 there.

Backward (FlashAttention-2), from dO = dL/dO:
    dV_j  = sum_i p_ij z_ij dO_i
    dP_ij = z_ij (dO_i . v_j)
    dS_ij = p_ij (dP_ij - D_i),  D_i = sum_j p_ij dP_ij = dO_i . o_i
    dQ_i  = scale * sum_j dS_ij k_j
    dK_j  = scale * sum_i dS_ij q_i
p_ij is recomputed from q, k and the saved lse; z_ij is regenerated from the
seed. Two kernels, no atomics, so the result is deterministic:
  _attention_bwd_dq_kernel: per query block, D_i = rowsum(dO * O) (stored for
      the next kernel), then dQ over a loop on key blocks;
  _attention_bwd_kernel: per key block, dK and dV over a loop on query blocks.
Masked keys get dK = dV = 0 (their column of P is 0); they are zeroed once at
the end of the key program instead of masking every tile.

D_i from the fp32 O, not the stored fp16/bf16 one. FlashAttention-2 takes
rowsum(dO * O) from O rounded to the output dtype; dP_ij - D_i then cancels that
rounding times dO wherever O is large against its spread (values sharing a mean,
as trained models' do: v + 10 put dq 1.3-1.7x past the tests' tolerance in
float16), and at sharp softmax rows. So the forward can also write O's rounding
residual R = O_fp32 - O (rounded to the output dtype: O + R carries about twice
the mantissa), and the dQ kernel takes D_i = rowsum(dO * (O + R)). The
autograd Function asks for R only when a gradient will be taken and the dtype
is not fp32 (one more (B, S, H, D) tensor saved per call); without R the
kernels are FlashAttention-2's.

Dropout: Philox (key = seed) on the counter (j // 4, i, head, batch) gives four
32-bit words, one for each of the keys 4*(j//4) .. 4*(j//4)+3; the probability
(batch, head, i, j) is kept when its word >> 1 >= dropout_p * 2**31. The mask
depends on the seed and on (batch, head, i, j) alone, never on block sizes, so
forward, backward and the debug launcher `attention_dropout_mask` regenerate
the same mask. In varlen mode i and j count from the start of each sequence
and batch is the sequence index: packed and padded layouts of the same data
drop the same probabilities.

Layouts: q, k, v, out are (batch, seqlen, heads, head_dim) with any strides but
a unit last stride (out's residual shares out's strides), or (total_tokens,
heads, head_dim) in varlen mode with cu_seqlens (batch + 1,) int32. lse and
delta are fp32 (batch, heads, seqlen), or (heads, total_tokens) in varlen mode.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .gelu import BUILT_FOR_INTERPRETER, _cdiv, _next_pow2, interpreter_launchable, on_input_device

LOG2E = 1.4426950408889634
# Head dims the kernels take: any multiple of 16 up to 128 (the tile's head
# dimension is padded to a power of two and masked).
SUPPORTED_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)
# FlashAttention-2 also uses 7 rounds for its dropout Philox; Triton's default is 10.
PHILOX_ROUNDS = 7


def _interpreting() -> bool:
    return BUILT_FOR_INTERPRETER


# ---------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32; IEEE for fp32 inputs (keeps fp32 accuracy, no TF32)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile, zero-filling rows >= n_rows and columns >= HEAD_DIM."""
    if EVEN_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return x


@triton.jit
def _store_rows(ptrs, x, rows, n_rows, offs_d,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_ROWS: tl.constexpr):
    """Store a (len(rows), BLOCK_D) tile, skipping rows >= n_rows and columns >= HEAD_DIM."""
    if EVEN_ROWS:
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=offs_d[None, :] < HEAD_DIM)
    else:
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dropout_keep(seed, off_b, off_h, offs_m, start_n, dropout_thresh,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PHILOX_ROUNDS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool, True where probability (off_b, off_h, offs_m, start_n + col) is kept.

    start_n must be a multiple of 4: one Philox call on (j // 4, i, h, b) serves four keys.
    """
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    zero = tl.zeros([BLOCK_M, BLOCK_N // 4], dtype=tl.uint32)
    c0 = zero + groups[None, :].to(tl.uint32)
    c1 = zero + offs_m[:, None].to(tl.uint32)
    c2 = zero + off_h.to(tl.uint32)
    c3 = zero + off_b.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3, PHILOX_ROUNDS)
    # join appends a last axis: join(join(r0, r1), join(r2, r3)) is (M, N/4, 2, 2) with [.., x, y] = r_{x + 2y},
    # so keys 4g .. 4g+3 take words r0, r2, r1, r3 (csrc/attention.cuh reproduces this order).
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK_M, BLOCK_N])
    return (r >> 1).to(tl.int32) >= dropout_thresh


@triton.jit
def _sequence(off_b, CuSeqlens, seqlen, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence off_b: from cu_seqlens, or (0, seqlen) when padded."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + off_b)
        n = tl.load(CuSeqlens + off_b + 1) - start
    else:
        start = off_b * 0
        n = seqlen
    return start, n


@triton.jit
def _key_end(mask_base, stride_ms, seqlen, BLOCK_N: tl.constexpr):
    """1 + the last real key of this row's padding mask, 0 when there is none.

    Keys past it are all masked, so the key loops stop there: a batch padded to its longest
    row spends no work on the trailing padding of the others. The results are the same to the
    bit: a fully masked block adds exp2(-inf) = 0 and rescales by exp2(0) = 1. (Holes before
    the end are masked as usual.) The scan reads the row's seqlen bytes, from L2 after the
    first program of the row.
    """
    end = tl.full([], 0, tl.int32)
    offs = tl.arange(0, BLOCK_N)
    for start in range(0, seqlen, BLOCK_N):
        cols = start + offs
        real = tl.load(mask_base + cols * stride_ms, mask=cols < seqlen, other=0) != 0
        end = tl.maximum(end, tl.max(tl.where(real, cols + 1, 0), 0))
    return end


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

# The seed changes every call: without do_not_specialize the JIT would compile another variant
# the first time a seed is divisible by 16 (or is 1), mid-training or inside a timed benchmark loop.
@triton.jit(do_not_specialize=["Seed"])
def _attention_fwd_kernel(
    Q,                      # (B, S, H, D) or (T, H, D) query
    K,                      # same layout, keys
    V,                      # same layout, values
    Out,                    # same layout, output
    OutRes,                 # out's rounding residual, out's dtype and strides (written when STORE_RESIDUAL)
    Lse,                    # fp32 (B, H, S) or (H, T): logsumexp of each score row (natural log)
    Mask,                   # uint8 (B, S): 1 = real key (read when HAS_MASK)
    CuSeqlens,              # int32 (B + 1,): sequence offsets (read when IS_VARLEN)
    Seed,                   # dropout seed: int, or pointer to one int64 when SEED_FROM_PTR
    stride_qb, stride_qs, stride_qh,   # q strides (batch stride 0 in varlen mode)
    stride_kb, stride_ks, stride_kh,   # k strides
    stride_vb, stride_vs, stride_vh,   # v strides
    stride_ob, stride_os, stride_oh,   # out strides
    stride_lb, stride_lh,   # lse strides (batch stride 0 in varlen mode; token stride 1)
    stride_mb, stride_ms,   # mask strides
    num_heads,              # H
    seqlen,                 # S (padded mode; varlen reads lengths from CuSeqlens)
    qk_scale,               # softmax_scale * log2(e)
    dropout_thresh,         # keep when Philox word >> 1 >= this (dropout_p * 2**31)
    dropout_scale,          # 1 / (1 - dropout_p)
    HEAD_DIM: tl.constexpr,        # D
    BLOCK_D: tl.constexpr,         # D rounded up to a power of two
    BLOCK_M: tl.constexpr,         # query rows per program
    BLOCK_N: tl.constexpr,         # keys per loop step
    EVEN_M: tl.constexpr,          # seqlen % BLOCK_M == 0 (padded mode): no row masks
    EVEN_N: tl.constexpr,          # seqlen % BLOCK_N == 0 (padded mode): no key bound masks
    HAS_MASK: tl.constexpr,        # key padding mask given
    IS_VARLEN: tl.constexpr,       # packed sequences with cu_seqlens
    DROPOUT: tl.constexpr,         # dropout_p > 0
    SEED_FROM_PTR: tl.constexpr,   # Seed is a pointer (torch.compile path)
    IEEE: tl.constexpr,            # fp32 inputs: full-precision dots
    PHILOX_ROUNDS: tl.constexpr,   # Philox rounds for dropout
    STORE_RESIDUAL: tl.constexpr,  # also write OutRes = out_fp32 - out (for the backward's D_i)
):
    # This program owns query rows [start_m * BLOCK_M, +BLOCK_M) of one (batch, head); one grid axis
    # (_grid), the blocks of one (batch, head) next to each other.
    n_blocks = tl.cdiv(seqlen, BLOCK_M)
    start_m = tl.program_id(0) % n_blocks
    off_bh = tl.program_id(0) // n_blocks
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    seq_start, seqlen = _sequence(off_b, CuSeqlens, seqlen, IS_VARLEN)
    if start_m * BLOCK_M >= seqlen:  # varlen: this sequence is shorter than max_seqlen
        return

    # 64-bit base offsets: batch x seqlen x heads x head_dim can pass 2**31
    row0 = seq_start.to(tl.int64)
    q_base = Q + off_b.to(tl.int64) * stride_qb + row0 * stride_qs + off_h * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + row0 * stride_ks + off_h * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + row0 * stride_vs + off_h * stride_vh
    o_off = off_b.to(tl.int64) * stride_ob + row0 * stride_os + off_h * stride_oh
    lse_base = Lse + off_b.to(tl.int64) * stride_lb + off_h * stride_lh + row0
    mask_base = Mask + off_b.to(tl.int64) * stride_mb

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_rows(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, EVEN_M)
    if DROPOUT:
        if SEED_FROM_PTR:
            seed = tl.load(Seed)
        else:
            seed = Seed

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_ptrs = k_base + offs_n0[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = v_base + offs_n0[:, None] * stride_vs + offs_d[None, :]
    key_end = seqlen
    if HAS_MASK:
        key_end = _key_end(mask_base, stride_ms, seqlen, BLOCK_N)
    for start_n in range(0, key_end, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_ptrs, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_N)
        qk = _dot(q, tl.trans(k), None, IEEE) * qk_scale                   # (BLOCK_M, BLOCK_N), log2 units
        if HAS_MASK:
            if EVEN_N:
                key_ok = tl.load(mask_base + offs_n * stride_ms) != 0
            else:
                key_ok = tl.load(mask_base + offs_n * stride_ms, mask=offs_n < seqlen, other=0) != 0
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
        elif not EVEN_N:
            qk = tl.where((offs_n < seqlen)[None, :], qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Rows with no valid key so far keep m = -inf: subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, off_b, off_h, offs_m, start_n, dropout_thresh,
                                 BLOCK_M, BLOCK_N, PHILOX_ROUNDS)
            p = tl.where(keep, p, 0.0)
        v = _load_rows(v_ptrs, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_N)
        acc = _dot(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs

    empty = l_i == 0.0                                    # every key masked: output 0, lse +inf
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if DROPOUT:
        inv_l = inv_l * dropout_scale
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    o_tile = o_off + offs_m[:, None] * stride_os + offs_d[None, :]
    out_rounded = out.to(Out.dtype.element_ty)
    _store_rows(Out + o_tile, out_rounded, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_M)
    if STORE_RESIDUAL:
        residual = (out - out_rounded.to(tl.float32)).to(Out.dtype.element_ty)
        _store_rows(OutRes + o_tile, residual, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_M)
    if EVEN_M:
        tl.store(lse_base + offs_m, lse)
    else:
        tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen)


# ---------------------------------------------------------------------------
# Launch settings
# ---------------------------------------------------------------------------

# Settings a tuning run imposes (benchmarks/tune_attention.py): "fwd", "bwd_dq" or "bwd" ->
# dict(BLOCK_M=, BLOCK_N=, num_warps=, num_stages=). Empty in normal use.
CONFIG_OVERRIDE: dict[str, dict] = {}
_FP32_TILE = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)


# Shared memory a program may take, per GPU: 227 KB on sm_90, 163 KB on sm_80, but 99 KB on sm_86,
# sm_89 and sm_120 (RTX 30/40/50, A10, L4, L40S). The half-precision tiles past head_dim 64 take up
# to 136 KB on sm_90 and 104 KB on sm_89, which Triton refuses at launch ("out of resource: shared
# memory"); where a program gets less than BIG_TILES_SHARED they halve the dimension that sizes the
# shared buffers: at most 57 KB on sm_89 (Triton 3.9), no spills on 8 warps (4 spilled up to 48 B),
# not yet timed. Every tile at head_dim <= 64, and float32's, fits in 99 KB. tests/triton_aot.py
# records each target's launches with its limit and fails a kernel past it.
BIG_TILES_SHARED = 140 * 1024


@functools.lru_cache(maxsize=None)
def _max_shared_of(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # what Triton compares a kernel's shared memory with at launch
        from triton.runtime import driver

        optin = driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return int(optin)


def _max_shared(device: torch.device) -> int | None:
    """Bytes of shared memory a program may take on the GPU `device` (opted in above 48 KB, as Triton
    does); None for the interpreter's CPU tensors."""
    if device.type != "cuda":
        return None
    return _max_shared_of(device.index if device.index is not None else torch.cuda.current_device())


def _small_shared(max_shared: int | None) -> bool:
    return max_shared is not None and max_shared < BIG_TILES_SHARED


def _fwd_config(head_dim: int, dtype: torch.dtype, max_shared: int | None = None) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the forward kernel; max_shared: the device's
    shared memory per program (None: as much as the tiles want, an sm_80 or sm_90)."""
    if "fwd" in CONFIG_OVERRIDE:
        return dict(CONFIG_OVERRIDE["fwd"])
    if _interpreting():  # small unequal tiles: many blocks per test, and BLOCK_M/BLOCK_N mix-ups show
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        # fp32 dots run on the FMA units: 64x32 on 4 warps spilled 100 B to 11 KB a thread on sm_90
        # (tests/triton_aot.py --resources, Triton 3.6); 32x32 on 8 warps: none at D <= 64, at most
        # 232 B in the dK/dV kernel at D 96-128 with dropout (kernels/RESOURCES.md). Not yet timed.
        return dict(_FP32_TILE)
    if head_dim <= 64:  # H200, B=32 H=12 D=64 fp16: 18 us at S=128, 100 us at S=512 (128x64: 43, 114)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if _small_shared(max_shared):  # see BIG_TILES_SHARED
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def _bwd_dq_config(head_dim: int, dtype: torch.dtype, max_shared: int | None = None) -> dict:
    if "bwd_dq" in CONFIG_OVERRIDE:
        return dict(CONFIG_OVERRIDE["bwd_dq"])
    if _interpreting():
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(_FP32_TILE)
    if head_dim <= 64:  # H200 sweep: within 2% of the best of 128x32/4, 128x64/8
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if _small_shared(max_shared):
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)


def _bwd_config(head_dim: int, dtype: torch.dtype, max_shared: int | None = None) -> dict:
    """dK/dV kernel: BLOCK_N keys owned per program, BLOCK_M queries per loop step."""
    if "bwd" in CONFIG_OVERRIDE:
        return dict(CONFIG_OVERRIDE["bwd"])
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(_FP32_TILE)
    if head_dim <= 64:  # H200 sweep: best of 32x128/4, 64x128/8, 64x64/4, 32x128/8
        return dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)
    if _small_shared(max_shared):
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2)


def _launch(kernel, wrap, q):
    """The kernel to launch: wrap_triton(kernel) inside the custom op, else the kernel itself.

    Interpreted kernels (TRITON_INTERPRET=1): gelu.interpreter_launchable (None on fake tensors: the
    launcher skips the launch).
    """
    if wrap is None:
        return kernel
    if _interpreting():
        return interpreter_launchable(kernel, q, "attention")
    return wrap(kernel)


def _layout(t, varlen):
    """(stride_b, stride_s, stride_h) of a (B, S, H, D) or packed (T, H, D) tensor."""
    stride = t.stride()
    if varlen:
        return 0, stride[0], stride[1]
    return stride[0], stride[1], stride[2]


def _problem(q, cu_seqlens, max_seqlen):
    """(batch, seqlen or max_seqlen, heads, head_dim, varlen)."""
    if cu_seqlens is not None:
        _, H, D = q.shape
        return cu_seqlens.shape[0] - 1, max_seqlen, H, D, True
    B, S, H, D = q.shape
    return B, S, H, D, False


def _dropout_args(dropout_p, seed):
    """(seed argument, SEED_FROM_PTR, threshold, scale) for the kernels."""
    if dropout_p <= 0.0:
        return 0, False, 0, 1.0
    thresh = min(int(round(dropout_p * 2.0**31)), 2**31 - 1)
    if isinstance(seed, torch.Tensor):
        return seed, True, thresh, 1.0 / (1.0 - dropout_p)
    return int(seed), False, thresh, 1.0 / (1.0 - dropout_p)


# Offsets inside one sequence (rows x heads x head_dim from its first element) are 32-bit in the kernels;
# the batch and sequence starts are 64-bit. Ordinary layouts stay far below this; a sequence-first or
# head-major view of a large batch does not.
_INT32_MAX = 2**31 - 1


def _sequence_span(t, rows):
    """The largest element offset the kernels form inside one sequence of t (B, S, H, D) or (T, H, D)."""
    return (rows - 1) * abs(t.stride(-3)) + (t.shape[-2] - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1)


def _with_small_offsets(t, rows):
    """t, or a contiguous copy of it where its strides would take the 32-bit offsets past 2**31."""
    return t if rows <= 0 or _sequence_span(t, rows) <= _INT32_MAX else t.contiguous()


def _check_small_offsets(rows, **buffers):
    """Buffers given to write into cannot be copied: refuse one whose strides the offsets cannot reach."""
    for name, t in buffers.items():
        if t is not None and rows > 0 and _sequence_span(t, rows) > _INT32_MAX:
            raise ValueError(f"attention: {name}'s strides {tuple(t.stride())} put elements of one sequence more "
                             f"than 2**31 apart, past the kernels' 32-bit offsets; pass a contiguous {name}")


def _grid(rows, block, B, H):
    """One grid axis: query (or key) blocks x batch x heads, (batch, head) major. Axis y, where B * H
    stood, stops at 65,535 programs (B >= 5,462 at 12 heads); axis x takes 2**31 - 1."""
    programs = _cdiv(rows, block) * B * H
    if programs > _INT32_MAX:
        raise ValueError(f"attention: {B} sequences x {H} heads x {_cdiv(rows, block)} blocks of {block} rows is "
                         f"more programs than one launch takes (2**31 - 1); split the batch")
    return (programs,)


def _check_residual(out_residual, out):
    """out's residual shares out's shape, dtype, device and strides (the kernels step both with out's)."""
    if out_residual is None:
        return
    if (out_residual.shape != out.shape or out_residual.dtype != out.dtype or out_residual.device != out.device
            or out_residual.stride() != out.stride()):
        raise ValueError(f"attention: out_residual must have out's shape {tuple(out.shape)}, dtype {out.dtype}, "
                         f"device {out.device} and strides {tuple(out.stride())}; got {tuple(out_residual.shape)} "
                         f"{out_residual.dtype} on {out_residual.device} strides {tuple(out_residual.stride())}")


def _mask_args(mask, q, wrap):
    """(the bool mask as uint8, or a dummy pointer; stride_b, stride_s)."""
    if mask is None:
        return q, 0, 0
    # Eager: a view of the same bytes. Inductor cannot lower a bool -> uint8 view, so the
    # compiled path converts instead (B x S bytes).
    m8 = mask.view(torch.uint8) if wrap is None else mask.to(torch.uint8)
    return m8, m8.stride(0), m8.stride(1)


@on_input_device
def attention_fwd(q, k, v, mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
                  softmax_scale=None, seed=0, out=None, lse=None, out_residual=None, *, wrap=None):
    """Forward launcher. Returns (out, lse).

    q, k, v: (B, S, H, D) with a unit last stride, or packed (T, H, D) with
    cu_seqlens int32 (B + 1,) and max_seqlen (an int >= every length).
    mask: optional (B, S) bool, True = real key (padded mode only).
    seed: int, or an int64 tensor of one element on q's device (read by the kernel).
    out, lse: optional preallocated outputs (tests poison them); out has q's
    shape, lse is fp32 (B, H, S) or (H, T).
    out_residual: None, or a tensor with out's shape, dtype and strides that receives
    out's rounding residual (the fp32 output minus out, in out's dtype), for
    attention_bwd's D_i (the module docstring).
    wrap: torch.library.wrap_triton inside the registered custom op, else None.
    """
    B, S, H, D, varlen = _problem(q, cu_seqlens, max_seqlen)
    q, k, v = (_with_small_offsets(t, S) for t in (q, k, v))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _check_residual(out_residual, out)
    _check_small_offsets(S, out=out)
    if lse is None:
        lse_shape = (H, q.shape[0]) if varlen else (B, H, S)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    mask_t, stride_mb, stride_ms = _mask_args(mask, q, wrap)
    seed_arg, seed_ptr, thresh, dscale = _dropout_args(dropout_p, seed)
    cfg = _fwd_config(D, q.dtype, _max_shared(q.device))
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = _grid(S, BLOCK_M, B, H)
    kernel = _launch(_attention_fwd_kernel, wrap, q)
    if kernel is None or grid[0] == 0:
        return out, lse
    kernel[grid](
        # no residual: q fills its pointer slot (never touched), as it does for an absent mask; not out,
        # which would then reach a compiled graph's kernel twice, once as an unwritten second output
        q, k, v, out, q if out_residual is None else out_residual, lse, mask_t, cu_seqlens if varlen else q,
        seed_arg, *_layout(q, varlen), *_layout(k, varlen), *_layout(v, varlen), *_layout(out, varlen),
        *lse_strides, stride_mb, stride_ms,
        H, S, scale * LOG2E, thresh, dscale,
        HEAD_DIM=D,
        BLOCK_D=max(_next_pow2(D), 16),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        EVEN_M=(not varlen) and S % BLOCK_M == 0,
        EVEN_N=(not varlen) and S % BLOCK_N == 0,
        HAS_MASK=mask is not None,
        IS_VARLEN=varlen,
        DROPOUT=dropout_p > 0.0,
        SEED_FROM_PTR=seed_ptr,
        IEEE=q.dtype == torch.float32,
        PHILOX_ROUNDS=PHILOX_ROUNDS,
        STORE_RESIDUAL=out_residual is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out, lse


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit(do_not_specialize=["Seed"])
def _attention_bwd_dq_kernel(
    Q,                      # (B, S, H, D) or (T, H, D) query
    K,                      # keys, same layout
    V,                      # values, same layout
    Out,                    # forward output, same layout
    OutRes,                 # its rounding residual, out's strides (read when HAS_RESIDUAL)
    DOut,                   # dL/dout, same layout
    Lse,                    # fp32 (B, H, S) or (H, T) from the forward
    Delta,                  # fp32, Lse's layout: written here, rowsum(dO * (O + OutRes)), read by the dK/dV kernel
    DQ,                     # dL/dq, q's layout
    Mask,                   # uint8 (B, S) key mask (HAS_MASK)
    CuSeqlens,              # int32 (B + 1,) (IS_VARLEN)
    Seed,                   # dropout seed (int or pointer)
    stride_qb, stride_qs, stride_qh,     # q strides
    stride_kb, stride_ks, stride_kh,     # k strides
    stride_vb, stride_vs, stride_vh,     # v strides
    stride_ob, stride_os, stride_oh,     # out strides
    stride_dob, stride_dos, stride_doh,  # dout strides
    stride_dqb, stride_dqs, stride_dqh,  # dq strides
    stride_lb, stride_lh,   # lse / delta strides
    stride_mb, stride_ms,   # mask strides
    num_heads,              # H
    seqlen,                 # S (padded mode)
    sm_scale,               # softmax scale
    qk_scale,               # softmax scale * log2(e)
    dropout_thresh,         # see the forward
    dropout_scale,          # 1 / (1 - dropout_p)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,         # query rows per program
    BLOCK_N: tl.constexpr,         # keys per loop step
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    IEEE: tl.constexpr,
    PHILOX_ROUNDS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,    # D_i from O + OutRes (the forward's fp32 O) instead of O
):
    # This program owns query rows [start_m * BLOCK_M, +BLOCK_M) of one (batch, head): their delta and dQ.
    n_blocks = tl.cdiv(seqlen, BLOCK_M)
    start_m = tl.program_id(0) % n_blocks
    off_bh = tl.program_id(0) // n_blocks
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    seq_start, seqlen = _sequence(off_b, CuSeqlens, seqlen, IS_VARLEN)
    if start_m * BLOCK_M >= seqlen:
        return

    row0 = seq_start.to(tl.int64)
    b64 = off_b.to(tl.int64)
    q_base = Q + b64 * stride_qb + row0 * stride_qs + off_h * stride_qh
    k_base = K + b64 * stride_kb + row0 * stride_ks + off_h * stride_kh
    v_base = V + b64 * stride_vb + row0 * stride_vs + off_h * stride_vh
    o_off = b64 * stride_ob + row0 * stride_os + off_h * stride_oh
    do_base = DOut + b64 * stride_dob + row0 * stride_dos + off_h * stride_doh
    dq_base = DQ + b64 * stride_dqb + row0 * stride_dqs + off_h * stride_dqh
    lse_off = b64 * stride_lb + off_h * stride_lh + row0
    mask_base = Mask + b64 * stride_mb

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_rows(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, EVEN_M)
    do = _load_rows(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], offs_m, seqlen, offs_d,
                    HEAD_DIM, BLOCK_D, EVEN_M)
    o_tile = o_off + offs_m[:, None] * stride_os + offs_d[None, :]
    o = _load_rows(Out + o_tile, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_M).to(tl.float32)
    if HAS_RESIDUAL:
        o += _load_rows(OutRes + o_tile, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_M).to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * o, 1)                             # (BLOCK_M,)
    if EVEN_M:
        tl.store(Delta + lse_off + offs_m, delta)
        lse2 = tl.load(Lse + lse_off + offs_m) * 1.4426950408889634
    else:
        tl.store(Delta + lse_off + offs_m, delta, mask=offs_m < seqlen)
        # rows past the end read lse = +inf, so their p is 0
        lse2 = tl.load(Lse + lse_off + offs_m, mask=offs_m < seqlen, other=float("inf")) * 1.4426950408889634
    if DROPOUT:
        if SEED_FROM_PTR:
            seed = tl.load(Seed)
        else:
            seed = Seed

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_ptrs = k_base + offs_n0[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = v_base + offs_n0[:, None] * stride_vs + offs_d[None, :]
    key_end = seqlen
    if HAS_MASK:
        key_end = _key_end(mask_base, stride_ms, seqlen, BLOCK_N)  # masked keys add nothing to dq
    for start_n in range(0, key_end, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_ptrs, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_N)
        v = _load_rows(v_ptrs, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_N)
        qk = _dot(q, tl.trans(k), None, IEEE) * qk_scale
        if HAS_MASK:
            if EVEN_N:
                key_ok = tl.load(mask_base + offs_n * stride_ms) != 0
            else:
                key_ok = tl.load(mask_base + offs_n * stride_ms, mask=offs_n < seqlen, other=0) != 0
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
        elif not EVEN_N:
            qk = tl.where((offs_n < seqlen)[None, :], qk, float("-inf"))
        p = tl.exp2(qk - lse2[:, None])                                    # (BLOCK_M, BLOCK_N)
        dp = _dot(do, tl.trans(v), None, IEEE)
        if DROPOUT:
            keep = _dropout_keep(seed, off_b, off_h, offs_m, start_n, dropout_thresh,
                                 BLOCK_M, BLOCK_N, PHILOX_ROUNDS)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, IEEE)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs

    dq = dq * sm_scale
    _store_rows(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_M)


@triton.jit(do_not_specialize=["Seed"])
def _attention_bwd_kernel(
    Q,                      # (B, S, H, D) or (T, H, D) query
    K,                      # keys, same layout
    V,                      # values, same layout
    DOut,                   # dL/dout, same layout
    Lse,                    # fp32 (B, H, S) or (H, T) from the forward
    Delta,                  # fp32, Lse's layout, from _attention_bwd_dq_kernel
    DK,                     # dL/dk, k's layout
    DV,                     # dL/dv, v's layout
    Mask,                   # uint8 (B, S) key mask (HAS_MASK)
    CuSeqlens,              # int32 (B + 1,) (IS_VARLEN)
    Seed,                   # dropout seed (int or pointer)
    stride_qb, stride_qs, stride_qh,     # q strides
    stride_kb, stride_ks, stride_kh,     # k strides
    stride_vb, stride_vs, stride_vh,     # v strides
    stride_dob, stride_dos, stride_doh,  # dout strides
    stride_dkb, stride_dks, stride_dkh,  # dk strides
    stride_dvb, stride_dvs, stride_dvh,  # dv strides
    stride_lb, stride_lh,   # lse / delta strides
    stride_mb, stride_ms,   # mask strides
    num_heads,              # H
    seqlen,                 # S (padded mode)
    sm_scale,               # softmax scale
    qk_scale,               # softmax scale * log2(e)
    dropout_thresh,         # see the forward
    dropout_scale,          # 1 / (1 - dropout_p)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,         # queries per loop step
    BLOCK_N: tl.constexpr,         # keys owned per program
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    IEEE: tl.constexpr,
    PHILOX_ROUNDS: tl.constexpr,
):
    # This program owns keys [start_n, +BLOCK_N) of one (batch, head): their dK and dV.
    n_blocks = tl.cdiv(seqlen, BLOCK_N)
    start_n = (tl.program_id(0) % n_blocks) * BLOCK_N
    off_bh = tl.program_id(0) // n_blocks
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    seq_start, seqlen = _sequence(off_b, CuSeqlens, seqlen, IS_VARLEN)
    if start_n >= seqlen:
        return

    row0 = seq_start.to(tl.int64)
    b64 = off_b.to(tl.int64)
    q_base = Q + b64 * stride_qb + row0 * stride_qs + off_h * stride_qh
    k_base = K + b64 * stride_kb + row0 * stride_ks + off_h * stride_kh
    v_base = V + b64 * stride_vb + row0 * stride_vs + off_h * stride_vh
    do_base = DOut + b64 * stride_dob + row0 * stride_dos + off_h * stride_doh
    dk_base = DK + b64 * stride_dkb + row0 * stride_dks + off_h * stride_dkh
    dv_base = DV + b64 * stride_dvb + row0 * stride_dvs + off_h * stride_dvh
    lse_off = b64 * stride_lb + off_h * stride_lh + row0

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], offs_n, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, EVEN_N)
    v = _load_rows(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], offs_n, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, EVEN_N)
    if DROPOUT:
        if SEED_FROM_PTR:
            seed = tl.load(Seed)
        else:
            seed = Seed

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_ptrs = q_base + offs_m0[:, None] * stride_qs + offs_d[None, :]
    do_ptrs = do_base + offs_m0[:, None] * stride_dos + offs_d[None, :]
    query_end = seqlen
    if HAS_MASK:
        # A block of padding keys gets dK = dV = 0 (set after the loop): skip the loop.
        key_ok = tl.load(Mask + b64 * stride_mb + offs_n * stride_ms, mask=offs_n < seqlen, other=0) != 0
        query_end = tl.where(tl.max(key_ok.to(tl.int32), 0) > 0, seqlen, 0)
    for start_m in range(0, query_end, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(q_ptrs, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_M)
        do = _load_rows(do_ptrs, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_M)
        if EVEN_M:
            lse2 = tl.load(Lse + lse_off + offs_m) * 1.4426950408889634
            delta = tl.load(Delta + lse_off + offs_m)
        else:
            lse2 = tl.load(Lse + lse_off + offs_m, mask=offs_m < seqlen, other=float("inf")) * 1.4426950408889634
            delta = tl.load(Delta + lse_off + offs_m, mask=offs_m < seqlen, other=0.0)
        # Transposed tiles (keys x queries). Masked keys are not masked here: their rows of
        # pT only reach their own rows of dK, dV, which are zeroed after the loop.
        qkT = _dot(k, tl.trans(q), None, IEEE) * qk_scale                   # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(qkT - lse2[None, :])
        dpT = _dot(v, tl.trans(do), None, IEEE)
        if DROPOUT:
            keepT = tl.trans(_dropout_keep(seed, off_b, off_h, offs_m, start_n, dropout_thresh,
                                           BLOCK_M, BLOCK_N, PHILOX_ROUNDS))
            pT_drop = tl.where(keepT, pT * dropout_scale, 0.0)
            dv = _dot(pT_drop.to(do.dtype), do, dv, IEEE)
            dpT = tl.where(keepT, dpT * dropout_scale, 0.0)
        else:
            dv = _dot(pT.to(do.dtype), do, dv, IEEE)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, IEEE)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos

    dk = dk * sm_scale
    if HAS_MASK:
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    _store_rows(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty),
                offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_N)
    _store_rows(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
                offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, EVEN_N)


@on_input_device
def attention_bwd(do, q, k, v, out, lse, mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
                  softmax_scale=None, seed=0, dq=None, dk=None, dv=None, out_residual=None, *, wrap=None):
    """Backward launcher. Returns (dq, dk, dv) in the layouts of q, k, v (contiguous).

    do: dL/dout, out's shape, unit last stride. out, lse: from attention_fwd.
    The other arguments are the forward's; seed must be the forward's seed.
    dq, dk, dv: optional preallocated outputs (tests poison them).
    out_residual: the forward's out_residual, or None (D_i from the rounded out).
    """
    B, S, H, D, varlen = _problem(q, cu_seqlens, max_seqlen)
    _check_residual(out_residual, out)
    _check_small_offsets(S, out=out, dq=dq, dk=dk, dv=dv)
    do, q, k, v = (_with_small_offsets(t, S) for t in (do, q, k, v))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    delta = torch.empty_like(lse)
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    mask_t, stride_mb, stride_ms = _mask_args(mask, q, wrap)
    seed_arg, seed_ptr, thresh, dscale = _dropout_args(dropout_p, seed)
    common = dict(
        HEAD_DIM=D,
        BLOCK_D=max(_next_pow2(D), 16),
        HAS_MASK=mask is not None,
        IS_VARLEN=varlen,
        DROPOUT=dropout_p > 0.0,
        SEED_FROM_PTR=seed_ptr,
        IEEE=q.dtype == torch.float32,
        PHILOX_ROUNDS=PHILOX_ROUNDS,
    )
    if _launch(_attention_bwd_kernel, wrap, q) is None or B * H * S == 0:
        return dq, dk, dv
    cu = cu_seqlens if varlen else q

    cfg = _bwd_dq_config(D, q.dtype, _max_shared(q.device))
    grid = _grid(S, cfg["BLOCK_M"], B, H)
    kernel = _launch(_attention_bwd_dq_kernel, wrap, q)
    kernel[grid](
        q, k, v, out, out if out_residual is None else out_residual, do, lse, delta, dq, mask_t, cu, seed_arg,
        *_layout(q, varlen), *_layout(k, varlen), *_layout(v, varlen), *_layout(out, varlen),
        *_layout(do, varlen), *_layout(dq, varlen),
        *lse_strides, stride_mb, stride_ms,
        H, S, scale, scale * LOG2E, thresh, dscale,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        EVEN_M=(not varlen) and S % cfg["BLOCK_M"] == 0,
        EVEN_N=(not varlen) and S % cfg["BLOCK_N"] == 0,
        HAS_RESIDUAL=out_residual is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **common,
    )

    cfg = _bwd_config(D, q.dtype, _max_shared(q.device))
    grid = _grid(S, cfg["BLOCK_N"], B, H)
    kernel = _launch(_attention_bwd_kernel, wrap, q)
    kernel[grid](
        q, k, v, do, lse, delta, dk, dv, mask_t, cu, seed_arg,
        *_layout(q, varlen), *_layout(k, varlen), *_layout(v, varlen),
        *_layout(do, varlen), *_layout(dk, varlen), *_layout(dv, varlen),
        *lse_strides, stride_mb, stride_ms,
        H, S, scale, scale * LOG2E, thresh, dscale,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        EVEN_M=(not varlen) and S % cfg["BLOCK_M"] == 0,
        EVEN_N=(not varlen) and S % cfg["BLOCK_N"] == 0,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Debug: the dropout mask the kernels use
# ---------------------------------------------------------------------------

@triton.jit
def _attention_dropout_mask_kernel(
    Keep,                   # uint8 (B, H, S, S) output: 1 = probability (b, h, i, j) kept
    Seed,                   # dropout seed (int)
    num_heads,              # H
    seqlen,                 # S
    dropout_thresh,         # as in the forward
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    PHILOX_ROUNDS: tl.constexpr,
):
    # This program owns rows [start_m * BLOCK_M, +BLOCK_M) of one (batch, head) of the mask.
    n_blocks = tl.cdiv(seqlen, BLOCK_M)
    start_m = tl.program_id(0) % n_blocks
    off_bh = tl.program_id(0) // n_blocks
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = Keep + off_bh.to(tl.int64) * seqlen * seqlen
    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(Seed, off_b, off_h, offs_m, start_n, dropout_thresh,
                             BLOCK_M, BLOCK_N, PHILOX_ROUNDS)
        ptrs = base + offs_m[:, None].to(tl.int64) * seqlen + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < seqlen) & (offs_n[None, :] < seqlen))


def attention_dropout_mask(batch, heads, seqlen, dropout_p, seed, device):
    """The keep-mask (batch, heads, seqlen, seqlen) bool the kernels use for this seed and dropout_p.

    Index [b, h, i, j]: query i, key j of sequence b (in varlen mode, positions
    within the sequence and seqlen = max_seqlen).
    """
    keep = torch.empty((batch, heads, seqlen, seqlen), dtype=torch.uint8, device=device)
    _, _, thresh, _ = _dropout_args(dropout_p, seed)
    if keep.numel():
        _fill_dropout_mask(keep, int(seed), thresh)
    return keep.bool()


@on_input_device
def _fill_dropout_mask(keep, seed, thresh):
    batch, heads, seqlen, _ = keep.shape
    _attention_dropout_mask_kernel[_grid(seqlen, 32, batch, heads)](keep, seed, heads, seqlen, thresh, BLOCK_M=32,
                                                                  BLOCK_N=32, PHILOX_ROUNDS=PHILOX_ROUNDS)

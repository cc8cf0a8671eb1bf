// Flash attention on the tensor cores (sm_80+): device code and launch templates.
//
// The math is the Triton kernels' (kernels/attention.py, whose header derives it):
//   forward   s_ij = scale q_i.k_j (-inf for masked keys), online softmax over key
//             blocks with a running max m_i and sum l_i, o_i = sum_j p_ij z_ij v_j,
//             lse_i = m_i + log l_i saved in fp32 (+inf for a row with no real key);
//   backward  D_i = rowsum(dO_i * O_i); p_ij = exp(s_ij - lse_i) recomputed;
//             dV_j = sum_i p_ij z_ij dO_i, dP_ij = z_ij dO_i.v_j, dS_ij = p_ij (dP_ij - D_i),
//             dQ_i = scale sum_j dS_ij k_j, dK_j = scale sum_i dS_ij q_i.
//   Two backward kernels and no atomics (deterministic): one per query block writes D
//   and dQ, one per key block writes dK and dV.
//   D_i from the fp32 O: when p.out_residual is set, the forward also writes O's
//   rounding residual (fp32 O - O, in O's dtype) and the backward takes
//   D_i = rowsum(dO_i * (O_i + R_i)). From the rounded O alone (FlashAttention-2's
//   way, and what a null out_residual gives) dP_ij - D_i cancels that rounding times
//   dO wherever O is large against its spread, e.g. values sharing a mean.
//
// Dropout: the Triton backend's Philox stream exactly (7 rounds, key = seed, counter
// (j / 4, i, head, batch), keep when word >> 1 >= round(p 2^31)), so the two backends
// drop the same probabilities for one seed, and forward, backward and the debug mask
// launcher regenerate the same mask. Keys 4(j/4) + 0, 1, 2, 3 take the Philox words
// w0, w2, w1, w3: the order Triton's join/join/reshape lays them out in (checked
// against the Triton kernel by tests/test_cuda_attention.py).
//
// Tensor-core layout (PTX ISA, "mma.m16n8k16" and "ldmatrix"): a warp computes
// D(16x8, fp32) += A(16x16, fp16/bf16, row) * B(16x8, col). Lane l has
// g = l / 4 (its "group") and t = l % 4 (its place in the group):
//   A regs a0..a3 (two 16-bit values each, lower column in the low half):
//     a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..2t+1]   a2 = A[g][2t+8..]   a3 = A[g+8][2t+8..]
//   B regs b0, b1:  b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
//   C/D regs c0..c3: c0,c1 = D[g][2t..2t+1]   c2,c3 = D[g+8][2t..2t+1]
// ldmatrix.x4 loads four 8x8 16-bit matrices; lanes 8m..8m+7 give the addresses of
// the 8 rows of matrix m; register m of lane l receives row l/4, columns 2(l%4)..+1
// of matrix m (with .trans: column l/4, rows 2(l%4)..+1, i.e. the transpose).
// Consequences used below (all tiles are row-major in shared memory):
//   * A operand from a tile X (rows = M, cols = K):  lane l points at
//     X[row0 + l % 16][col0 + (l / 16) * 8]  -> regs are exactly a0..a3.
//   * B operand for X^T (X rows = N, cols = K; e.g. S = Q K^T with X = K): lane l
//     points at X[n0 + (l & 7) + (l / 16) * 8][k0 + ((l / 8) & 1) * 8]
//     -> regs {0,1} = (b0,b1) of n-block n0..n0+7, regs {2,3} of n0+8..n0+15.
//   * B operand for X itself (X rows = K, cols = N; e.g. O = P V with X = V), with
//     .trans: lane l points at X[k0 + (l & 7) + ((l / 8) & 1) * 8][n0 + (l / 16) * 8]
//     -> regs {0,1} = (b0,b1) of n-block n0..n0+7, regs {2,3} of n0+8..n0+15.
//   * An accumulator tile C (16 x 16j) becomes the A operand of the next product
//     without leaving registers: for k-block kb (columns 16kb..16kb+15),
//     a0 = pack(c[2kb][0..1]), a1 = pack(c[2kb][2..3]), a2 = pack(c[2kb+1][0..1]),
//     a3 = pack(c[2kb+1][2..3]), where c[j] is the 16x8 accumulator of columns 8j..8j+7.
// Every warp owns 16 rows of a tile, so the row statistics (max, sum) of a lane's
// two rows g and g+8 are reduced over the 4 lanes of its group with shfl_xor 1, 2.
//
// Shared-memory tiles are padded to D + 8 elements per row (16 bytes): the 8 row
// addresses of one ldmatrix matrix then fall in 8 different 16-byte bank groups
// (row strides of 80, 144, 272 bytes for D = 32, 64, 128), with no swizzle.
// Global -> shared copies are 16-byte cp.async (cg: L2 only); rows past the end of
// the sequence are zero-filled (src-size 0), so padded rows are finite zeros.
// Requirements checked on the Python side: 16-byte aligned base pointers, and
// batch/seq/head strides that are multiples of 8 elements.
//
// Launch: grid (batch * heads, row blocks of the sequence), 128 threads (4 warps),
// dynamic shared memory (opted in above 48 KB); varlen blocks past their sequence's
// end exit at once. Every kernel exits or waits uniformly per block (no divergent
// barriers). Tile sizes: FwdTile, DqTile, DkvTile below.
//
// Without a GPU: tests/cuda_emu compiles this file with g++ and -DFASTBERT_ATTN_EMULATE
// (which replaces only the PTX primitives and the <<<>>> launches) and runs the kernels
// on a CPU emulation of a thread block, with shared-memory race and bounds checks.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "attention.h"  // AttentionParams; fastbert.h: FASTBERT_CUDA_CHECK, FASTBERT_LAUNCH_CHECK

namespace fastbert {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarps = 4;                 // every kernel: 4 warps, each owning 16 rows of its tile
constexpr int kThreads = kWarps * 32;
constexpr int kSmemPad = 8;               // elements added to each shared-memory row (16 bytes)
constexpr int kPhiloxRounds = 7;          // as kernels/attention.py (PHILOX_ROUNDS)

// Tile sizes. Forward: 64 query rows per block (16 per warp), 64 keys per step.
// Backward dQ: 64 query rows per block, keys per step halved at D = 128 to keep
// q, dO, dQ and two score tiles in registers. Backward dK/dV: 64 keys per block
// (16 per warp), queries per step halved at D = 128 for the same reason.
template <int D> struct FwdTile  { static constexpr int kBlockM = 64, kBlockN = 64; };
template <int D> struct DqTile   { static constexpr int kBlockM = 64, kBlockN = D <= 64 ? 64 : 32; };
template <int D> struct DkvTile  { static constexpr int kBlockN = 64, kBlockM = D <= 64 ? 64 : 32; };

template <int D, int ROWS, typename T>
constexpr size_t tile_bytes() { return size_t(ROWS) * (D + kSmemPad) * sizeof(T); }

// ---------------------------------------------------------------------------
// Philox-4x32 (host and device): Triton's tl.philox with 7 rounds.
// ---------------------------------------------------------------------------

struct Philox4 { uint32_t w0, w1, w2, w3; };

__host__ __device__ __forceinline__ uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ Philox4 philox(uint64_t seed, uint32_t c0, uint32_t c1,
                                                   uint32_t c2, uint32_t c3) {
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
    for (int r = 0; r < kPhiloxRounds; ++r) {
        const uint32_t n0 = umulhi32(0xCD9E8D57u, c2) ^ c1 ^ k0;
        const uint32_t n2 = umulhi32(0xD2511F53u, c0) ^ c3 ^ k1;
        const uint32_t n1 = 0xCD9E8D57u * c2;
        const uint32_t n3 = 0xD2511F53u * c0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return {c0, c1, c2, c3};
}

// Is probability (b, h, i, j) kept? One Philox call serves the keys 4(j/4)..4(j/4)+3:
// key j % 4 = 0, 1, 2, 3 takes word w0, w2, w1, w3.
__host__ __device__ __forceinline__ bool dropout_keep(uint64_t seed, int b, int h, int i, int j,
                                                      uint32_t threshold) {
    const Philox4 r = philox(seed, static_cast<uint32_t>(j) >> 2, static_cast<uint32_t>(i),
                             static_cast<uint32_t>(h), static_cast<uint32_t>(b));
    // chosen with selects (a run-time index into r would move it to local memory)
    const uint32_t w = (j & 1) ? ((j & 2) ? r.w3 : r.w2) : ((j & 2) ? r.w1 : r.w0);
    return (w >> 1) >= threshold;
}

// Keys j and j + 1 (j even) of row i, from one Philox call: j % 4 == 0 -> (w0, w2),
// j % 4 == 2 -> (w1, w3).
__host__ __device__ __forceinline__ void dropout_keep_pair(uint64_t seed, int b, int h, int i, int j,
                                                           uint32_t threshold, bool& keep0, bool& keep1) {
    const Philox4 r = philox(seed, static_cast<uint32_t>(j) >> 2, static_cast<uint32_t>(i),
                             static_cast<uint32_t>(h), static_cast<uint32_t>(b));
    const uint32_t lo = (j & 2) ? r.w1 : r.w0;
    const uint32_t hi = (j & 2) ? r.w3 : r.w2;
    keep0 = (lo >> 1) >= threshold;
    keep1 = (hi >> 1) >= threshold;
}

// ---------------------------------------------------------------------------
// Warp-level primitives (PTX)
// ---------------------------------------------------------------------------
#if defined(FASTBERT_ATTN_EMULATE)
// A CPU emulation of these primitives (tests/cuda_emu) defines them instead.
#include FASTBERT_ATTN_EMULATE
#else

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements; see the layout notes at the top.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_ptr))
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_ptr))
                 : "memory");
}

// 16 bytes global -> shared, asynchronously; valid == false writes 16 zero bytes.
__device__ __forceinline__ void cp_async_16(void* smem_ptr, const void* gmem_ptr, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(smem_addr(smem_ptr)), "l"(gmem_ptr), "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void block_sync() { __syncthreads(); }

// The block's dynamic shared memory (16-byte aligned: uint4).
__device__ __forceinline__ uint4* dynamic_smem() {
    extern __shared__ uint4 smem_u4[];
    return smem_u4;
}

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// d += a * b on one m16n8k16 tile, fp32 accumulate.
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                                                 uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // FASTBERT_ATTN_EMULATE

// ---------------------------------------------------------------------------
// Element conversions
// ---------------------------------------------------------------------------

// Two floats -> one 32-bit register of two 16-bit values, `lo` in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
}

template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t u);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
    __half2 v;
    memcpy(&v, &u, sizeof(u));
    return __half22float2(v);
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
    __nv_bfloat162 v;
    memcpy(&v, &u, sizeof(u));
    return __bfloat1622float2(v);
}

// sum over 8 elements of x * y (one 16-byte vector of each), in fp32.
template <typename T> __device__ __forceinline__ float dot8(uint4 x, uint4 y) {
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w};
    const uint32_t ys[4] = {y.x, y.y, y.z, y.w};
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 a = unpack2<T>(xs[e]);
        const float2 b = unpack2<T>(ys[e]);
        acc += a.x * b.x + a.y * b.y;
    }
    return acc;
}

__device__ __forceinline__ void store32(void* ptr, uint32_t v) { *static_cast<uint32_t*>(ptr) = v; }

// ---------------------------------------------------------------------------
// Sequences, tiles
// ---------------------------------------------------------------------------

struct Sequence {
    int start;  // first token of sequence b (packed mode), else 0
    int len;    // its length
};

__device__ __forceinline__ Sequence sequence_of(const AttentionParams& p, int b) {
    if (p.cu_seqlens != nullptr) {
        const int start = p.cu_seqlens[b];
        return {start, p.cu_seqlens[b + 1] - start};
    }
    return {0, p.seqlen};
}

// Row 0 of the (b, h) slice of a (B, S, H, D) / (T, H, D) tensor.
template <typename Ptr>
__device__ __forceinline__ Ptr slice(Ptr base, int b, int h, const Sequence& seq, int64_t stride_b,
                                     int64_t stride_s, int64_t stride_h) {
    return base + b * stride_b + static_cast<int64_t>(seq.start) * stride_s + h * stride_h;
}

// Copy rows [row0, row0 + ROWS) x D of a slice (row stride `row_stride`) into a
// ROWS x (D + pad) shared tile; rows >= nrows become zeros. Issued by all
// kThreads threads, 16 bytes each per step, consecutive threads on consecutive
// 16-byte chunks of a row (coalesced). The caller commits and waits.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int row0, int nrows) {
    constexpr int kChunks = D / 8;                    // 16-byte chunks per row
    constexpr int kSteps = ROWS * kChunks / kThreads;
    static_assert(ROWS * kChunks % kThreads == 0, "tile must split evenly over the block");
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
        const int c = s * kThreads + static_cast<int>(threadIdx.x);
        const int r = c / kChunks;
        const int col = (c % kChunks) * 8;
        const int row = row0 + r;
        const bool valid = row < nrows;
        // an invalid row reads nothing (src-size 0); point it at the slice's row 0 anyway
        const T* src = gmem + (valid ? row * row_stride + col : 0);
        cp_async_16(smem + r * (D + kSmemPad) + col, src, valid);
    }
}

// A operand (16 x 16) from a row-major tile, rows row0.., columns col0..
template <int D, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int col0, int lane) {
    ldsm_x4(a, tile + (row0 + (lane & 15)) * (D + kSmemPad) + col0 + (lane >> 4) * 8);
}

// B operands of two n-blocks (n0..n0+7, n0+8..n0+15) for X^T, X a row-major tile
// of N rows and K columns; k-block k0..k0+15.
template <int D, typename T>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
    ldsm_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * (D + kSmemPad) + k0 + ((lane >> 3) & 1) * 8);
}

// B operands of two n-blocks (n0..n0+7, n0+8..n0+15) for X itself, X a row-major tile
// of K rows and N columns; k-block k0..k0+15.
template <int D, typename T>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], const T* tile, int k0, int n0, int lane) {
    ldsm_x4_trans(b, tile + (k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * (D + kSmemPad) + n0 + (lane >> 4) * 8);
}

// Is key j of sequence b a real token? (bounds, then the padding mask)
__device__ __forceinline__ bool key_valid(const uint8_t* mask_row, int64_t mask_stride, int j, int len) {
    return j < len && (mask_row == nullptr || mask_row[j * mask_stride] != 0);
}

// 1 + the last real key of the row (0 when none; len without a mask), the same in every lane:
// the key loops of the forward and dQ kernels stop there, so the trailing padding of a batch
// padded to its longest row costs nothing (a fully masked block adds exactly nothing to the
// online softmax, so the results do not change). Each warp scans the row on its own (len / 32
// byte loads a lane, then a butterfly max): no shared memory, no barrier.
__device__ __forceinline__ int key_end(const uint8_t* mask_row, int64_t mask_stride, int len, int lane) {
    if (mask_row == nullptr) return len;
    int end = 0;
    for (int j = lane; j < len; j += 32) {
        if (mask_row[j * mask_stride] != 0) end = j + 1;  // j rises: the last hit is the lane's largest
    }
    float e = static_cast<float>(end);  // exact: len < 2^24
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) e = fmaxf(e, shfl_xor(e, o));
    return static_cast<int>(e);
}

// Does the key block [n0, n0 + bn) hold a real key? The same answer in every warp (each scans
// the block's bn mask bytes itself), so the dK/dV kernel's loop count stays block-uniform.
__device__ __forceinline__ bool any_real_key(const uint8_t* mask_row, int64_t mask_stride, int n0, int bn, int len,
                                             int lane) {
    if (mask_row == nullptr) return n0 < len;
    float any = 0.f;
    for (int j = n0 + lane; j < n0 + bn && j < len; j += 32) {
        if (mask_row[j * mask_stride] != 0) any = 1.f;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) any = fmaxf(any, shfl_xor(any, o));
    return any > 0.f;
}

__device__ __forceinline__ uint64_t dropout_seed(const AttentionParams& p) {
    return p.seed_ptr != nullptr ? static_cast<uint64_t>(*p.seed_ptr) : p.seed;
}

// The keep bits of this lane's 2 * N / 8 probabilities of one row in an accumulator tile
// of N key columns: bit 2j + c is key j0 + 8j + c (j0 = first key + 2t, even) of query i.
// A rolled loop: one Philox chain in flight at a time instead of N / 8 (registers).
template <int N>
__device__ __forceinline__ uint32_t dropout_bits_row(uint64_t seed, int b, int h, int i, int j0,
                                                     uint32_t threshold) {
    static_assert(N / 4 <= 32, "bits of one row must fit 32");
    uint32_t bits = 0;
#pragma unroll 1
    for (int j = 0; j < N / 8; ++j) {
        bool keep0, keep1;
        dropout_keep_pair(seed, b, h, i, j0 + 8 * j, threshold, keep0, keep1);
        bits |= (static_cast<uint32_t>(keep0) << (2 * j)) | (static_cast<uint32_t>(keep1) << (2 * j + 1));
    }
    return bits;
}

// The same for a transposed tile (rows = keys, N query columns): bit 2j + c is query
// i0 + 8j + c (i0 = first query + 2t) with key `key`. One Philox call per element.
template <int N>
__device__ __forceinline__ uint32_t dropout_bits_col(uint64_t seed, int b, int h, int i0, int key,
                                                     uint32_t threshold) {
    static_assert(N / 4 <= 32, "bits of one row must fit 32");
    uint32_t bits = 0;
#pragma unroll 1
    for (int e = 0; e < N / 4; ++e) {  // e = 2j + c
        const int i = i0 + 8 * (e >> 1) + (e & 1);
        bits |= static_cast<uint32_t>(dropout_keep(seed, b, h, i, key, threshold)) << e;
    }
    return bits;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Block (bh, m_block) owns query rows [64 m_block, +64) of one (batch, head); warp w
// owns rows 16w..16w+15 of them. Shared memory: Q (64 rows), K (64), V (64). While a
// warp computes S = Q K^T it already has V streaming in; while it computes P V the
// next K streams in (FlashAttention-2's schedule with one buffer per tile).
template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
    constexpr int BM = FwdTile<D>::kBlockM;
    constexpr int BN = FwdTile<D>::kBlockN;
    static_assert(BM == 16 * kWarps && BN % 16 == 0 && D % 16 == 0, "tile shape");

    T* sQ = reinterpret_cast<T*>(dynamic_smem());  // 16-byte aligned for cp.async and ldmatrix
    T* sK = sQ + BM * (D + kSmemPad);
    T* sV = sK + BN * (D + kSmemPad);

    const int bh = blockIdx.x;
    const int b = bh / p.heads;
    const int h = bh % p.heads;
    const int m0 = blockIdx.y * BM;
    const Sequence seq = sequence_of(p, b);
    if (m0 >= seq.len) return;  // packed mode: sequence b is shorter than max_seqlen (whole block)

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;  // this lane's rows in the warp's 16: g and g + 8
    const int t = lane & 3;   // this lane's columns in each 8-column block: 2t, 2t + 1

    const T* q = slice(static_cast<const T*>(p.q), b, h, seq, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
    const T* k = slice(static_cast<const T*>(p.k), b, h, seq, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    const T* v = slice(static_cast<const T*>(p.v), b, h, seq, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
    T* o = slice(static_cast<T*>(p.out), b, h, seq, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
    T* res = p.out_residual == nullptr ? nullptr  // out's strides
             : slice(static_cast<T*>(p.out_residual), b, h, seq, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
    float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + seq.start;
    const uint8_t* mask = p.mask != nullptr ? p.mask + b * p.mask_batch_stride : nullptr;

    load_tile<BM, D>(sQ, q, p.q_row_stride, m0, seq.len);
    load_tile<BN, D>(sK, k, p.k_row_stride, 0, seq.len);
    cp_async_commit();
    const uint64_t seed = DROPOUT ? dropout_seed(p) : 0;

    float acc[D / 8][4];       // O accumulator: 16 rows x D (n-blocks of 8 columns)
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dn][e] = 0.f;
    }
    float row_max[2] = {-INFINITY, -INFINITY};  // rows g, g + 8; base-2 units
    float row_sum[2] = {0.f, 0.f};              // this lane's partial sums (reduced at the end)

    cp_async_wait<0>();
    block_sync();
    uint32_t qf[D / 16][4];    // this warp's 16 query rows as A operands, all of D
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a<D>(qf[kk], sQ, warp * 16, kk * 16, lane);

    const int n_blocks = (key_end(mask, p.mask_row_stride, seq.len, lane) + BN - 1) / BN;
    for (int nb = 0; nb < n_blocks; ++nb) {
        const int n0 = nb * BN;
        if (nb > 0) {
            cp_async_wait<0>();  // this thread's part of K[nb]
            block_sync();        // everyone's K[nb]; every warp done reading V[nb - 1]
        }
        load_tile<BN, D>(sV, v, p.v_row_stride, n0, seq.len);
        cp_async_commit();

        // S = Q K^T: 16 x BN per warp
        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t kb[4];
                load_b_rows<D>(kb, sK, np * 16, kk * 16, lane);
                mma_16816<T>(s[2 * np], qf[kk], kb[0], kb[1]);
                mma_16816<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
            }
        }

        // scale to base-2 units; -inf for padding keys and keys past the end
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] *= p.scale_log2;
        }
        if (mask != nullptr || n0 + BN > seq.len) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    if (!key_valid(mask, p.mask_row_stride, n0 + 8 * j + 2 * t + c, seq.len)) {
                        s[j][c] = -INFINITY;      // row g
                        s[j][2 + c] = -INFINITY;  // row g + 8
                    }
                }
            }
        }

        // online softmax: new max, rescale the old terms, p = exp2(s - max)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float m = row_max[r];
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) m = fmaxf(m, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
            m = fmaxf(m, shfl_xor(m, 1));
            m = fmaxf(m, shfl_xor(m, 2));
            // a row with no real key so far keeps max -inf: subtract 0 so exp2 gives 0, not NaN
            const float m_safe = m == -INFINITY ? 0.f : m;
            const float alpha = exp2f(row_max[r] - m_safe);
            row_max[r] = m;
            row_sum[r] *= alpha;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                acc[dn][2 * r] *= alpha;
                acc[dn][2 * r + 1] *= alpha;
            }
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                s[j][2 * r] = exp2f(s[j][2 * r] - m_safe);
                s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - m_safe);
                row_sum[r] += s[j][2 * r] + s[j][2 * r + 1];
            }
        }

        // dropout drops terms of the output only (the normaliser keeps them)
        if (DROPOUT) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const uint32_t keep = dropout_bits_row<BN>(seed, b, h, m0 + warp * 16 + g + 8 * r, n0 + 2 * t,
                                                           p.dropout_threshold);
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    if (!((keep >> (2 * j)) & 1u)) s[j][2 * r] = 0.f;
                    if (!((keep >> (2 * j + 1)) & 1u)) s[j][2 * r + 1] = 0.f;
                }
            }
        }

        cp_async_wait<0>();  // this thread's part of V[nb]
        block_sync();        // everyone's V[nb]; every warp done reading K[nb]
        if (nb + 1 < n_blocks) load_tile<BN, D>(sK, k, p.k_row_stride, n0 + BN, seq.len);
        cp_async_commit();

        // O += P V: P (16 x BN) from the S registers, V (BN x D) from shared memory
#pragma unroll
        for (int kb = 0; kb < BN / 16; ++kb) {
            uint32_t pa[4];
            pa[0] = pack2<T>(s[2 * kb][0], s[2 * kb][1]);
            pa[1] = pack2<T>(s[2 * kb][2], s[2 * kb][3]);
            pa[2] = pack2<T>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
            pa[3] = pack2<T>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t vb[4];
                load_b_cols<D>(vb, sV, kb * 16, dp * 16, lane);
                mma_16816<T>(acc[2 * dp], pa, vb[0], vb[1]);
                mma_16816<T>(acc[2 * dp + 1], pa, vb[2], vb[3]);
            }
        }
    }
    cp_async_wait<0>();  // nothing is in flight at exit (the last group is empty)

    // o = acc / l; lse = (m + log2 l) ln 2; a row with no real key: o = 0, lse = +inf
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += shfl_xor(l, 1);
        l += shfl_xor(l, 2);
        const bool empty = l == 0.f;
        float inv = empty ? 0.f : 1.f / l;
        if (DROPOUT) inv *= p.dropout_scale;
        const int i = m0 + warp * 16 + g + 8 * r;
        if (i < seq.len) {
            T* orow = o + i * p.o_row_stride;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                const float x0 = acc[dn][2 * r] * inv, x1 = acc[dn][2 * r + 1] * inv;
                const uint32_t rounded = pack2<T>(x0, x1);
                store32(orow + dn * 8 + 2 * t, rounded);
                if (res != nullptr) {
                    const float2 back = unpack2<T>(rounded);
                    store32(res + (orow - o) + dn * 8 + 2 * t, pack2<T>(x0 - back.x, x1 - back.y));
                }
            }
            if (t == 0) lse[i] = empty ? INFINITY : (row_max[r] + log2f(l)) * kLn2;
        }
    }
}

// ---------------------------------------------------------------------------
// Backward, kernel 1: D = rowsum(dO * O) and dQ, per query block
// ---------------------------------------------------------------------------

// Block (bh, m_block) owns query rows [64 m_block, +64) of one (batch, head); warp w
// owns rows 16w..16w+15. It writes their D (read by the dK/dV kernel) and dQ.
// Shared memory: Q, dO (64 rows each; moved to registers once), K and V (BN rows,
// two stages each: the next block streams in while this one is used), D (64 floats).
template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const AttentionParams p) {
    constexpr int BM = DqTile<D>::kBlockM;
    constexpr int BN = DqTile<D>::kBlockN;
    static_assert(BM == 16 * kWarps && BN % 16 == 0 && D % 16 == 0, "tile shape");

    T* sQ = reinterpret_cast<T*>(dynamic_smem());
    T* sdO = sQ + BM * (D + kSmemPad);
    T* sK0 = sdO + BM * (D + kSmemPad);           // stage s: sK0 + s * BN * (D + pad)
    T* sV0 = sK0 + 2 * BN * (D + kSmemPad);
    float* s_delta = reinterpret_cast<float*>(sV0 + 2 * BN * (D + kSmemPad));

    const int bh = blockIdx.x;
    const int b = bh / p.heads;
    const int h = bh % p.heads;
    const int m0 = blockIdx.y * BM;
    const Sequence seq = sequence_of(p, b);
    if (m0 >= seq.len) return;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;

    const T* q = slice(static_cast<const T*>(p.q), b, h, seq, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
    const T* k = slice(static_cast<const T*>(p.k), b, h, seq, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    const T* v = slice(static_cast<const T*>(p.v), b, h, seq, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
    const T* o = slice(static_cast<const T*>(p.out), b, h, seq, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
    const T* res = p.out_residual == nullptr ? nullptr  // out's strides
                   : slice(static_cast<const T*>(p.out_residual), b, h, seq, p.o_batch_stride, p.o_row_stride,
                           p.o_head_stride);
    const T* dout = slice(static_cast<const T*>(p.dout), b, h, seq, p.do_batch_stride, p.do_row_stride,
                          p.do_head_stride);
    T* dq = slice(static_cast<T*>(p.dq), b, h, seq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
    const int64_t stat_off = b * p.lse_batch_stride + h * p.lse_head_stride + seq.start;
    const float* lse = p.lse + stat_off;
    float* delta = p.delta + stat_off;
    const uint8_t* mask = p.mask != nullptr ? p.mask + b * p.mask_batch_stride : nullptr;

    load_tile<BM, D>(sQ, q, p.q_row_stride, m0, seq.len);
    load_tile<BM, D>(sdO, dout, p.do_row_stride, m0, seq.len);
    load_tile<BN, D>(sK0, k, p.k_row_stride, 0, seq.len);
    load_tile<BN, D>(sV0, v, p.v_row_stride, 0, seq.len);
    cp_async_commit();
    const uint64_t seed = DROPOUT ? dropout_seed(p) : 0;

    // D_i = dO_i . (O_i + R_i) in fp32, from global memory while the tiles stream in:
    // two threads per row, each over half of the head dim.
    {
        const int r = tid >> 1;
        const int i = m0 + r;
        float part = 0.f;
        if (i < seq.len) {
            const int64_t off = i * p.o_row_stride + (tid & 1) * (D / 2);
            const T* drow = dout + i * p.do_row_stride + (tid & 1) * (D / 2);
#pragma unroll
            for (int c = 0; c < D / 2; c += 8) {
                const uint4 d8 = *reinterpret_cast<const uint4*>(drow + c);
                part += dot8<T>(*reinterpret_cast<const uint4*>(o + off + c), d8);
                if (res != nullptr) part += dot8<T>(*reinterpret_cast<const uint4*>(res + off + c), d8);
            }
        }
        part += shfl_xor(part, 1);
        if ((tid & 1) == 0) {
            s_delta[r] = part;
            if (i < seq.len) delta[i] = part;
        }
    }
    // lse of this lane's rows in base-2 units; rows past the end get +inf, so p = 0 there
    float lse2[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = m0 + warp * 16 + g + 8 * r;
        lse2[r] = i < seq.len ? lse[i] * kLog2e : INFINITY;
    }

    cp_async_wait<0>();
    block_sync();  // tiles and s_delta visible to every warp
    uint32_t qf[D / 16][4];
    uint32_t dof[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        load_a<D>(qf[kk], sQ, warp * 16, kk * 16, lane);
        load_a<D>(dof[kk], sdO, warp * 16, kk * 16, lane);
    }
    const float delta_r[2] = {s_delta[warp * 16 + g], s_delta[warp * 16 + g + 8]};

    float dq_acc[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dq_acc[dn][e] = 0.f;
    }

    const int n_blocks = (key_end(mask, p.mask_row_stride, seq.len, lane) + BN - 1) / BN;
    for (int nb = 0; nb < n_blocks; ++nb) {
        const int n0 = nb * BN;
        const int stage = nb & 1;
        const T* sK = sK0 + stage * BN * (D + kSmemPad);
        const T* sV = sV0 + stage * BN * (D + kSmemPad);
        if (nb + 1 < n_blocks) {
            // into the other stage, last read in step nb - 1 (finished: trailing barrier)
            const int next = (stage ^ 1) * BN * (D + kSmemPad);
            load_tile<BN, D>(sK0 + next, k, p.k_row_stride, n0 + BN, seq.len);
            load_tile<BN, D>(sV0 + next, v, p.v_row_stride, n0 + BN, seq.len);
            cp_async_commit();
            cp_async_wait<1>();  // block nb has landed (only nb + 1 may be in flight)
        } else {
            cp_async_wait<0>();
        }
        block_sync();

        // S = Q K^T and dP = dO V^T: 16 x BN each per warp
        float s[BN / 8][4];
        float dp[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = 0.f;
                dp[j][e] = 0.f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t kb[4];
                load_b_rows<D>(kb, sK, np * 16, kk * 16, lane);
                mma_16816<T>(s[2 * np], qf[kk], kb[0], kb[1]);
                mma_16816<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
                uint32_t vb[4];
                load_b_rows<D>(vb, sV, np * 16, kk * 16, lane);
                mma_16816<T>(dp[2 * np], dof[kk], vb[0], vb[1]);
                mma_16816<T>(dp[2 * np + 1], dof[kk], vb[2], vb[3]);
            }
        }

        // P = exp2(S scale log2e - lse log2e) (0 for masked keys), dS = P (dP z - D); s <- dS
        uint32_t keep[2] = {~0u, ~0u};
        if (DROPOUT) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                keep[r] = dropout_bits_row<BN>(seed, b, h, m0 + warp * 16 + g + 8 * r, n0 + 2 * t,
                                               p.dropout_threshold);
            }
        }
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int key = n0 + 8 * j + 2 * t;
            const bool ok0 = key_valid(mask, p.mask_row_stride, key, seq.len);
            const bool ok1 = key_valid(mask, p.mask_row_stride, key + 1, seq.len);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float dp0 = dp[j][2 * r];
                float dp1 = dp[j][2 * r + 1];
                if (DROPOUT) {
                    dp0 = (keep[r] >> (2 * j)) & 1u ? dp0 * p.dropout_scale : 0.f;
                    dp1 = (keep[r] >> (2 * j + 1)) & 1u ? dp1 * p.dropout_scale : 0.f;
                }
                const float p0 = ok0 ? exp2f(s[j][2 * r] * p.scale_log2 - lse2[r]) : 0.f;
                const float p1 = ok1 ? exp2f(s[j][2 * r + 1] * p.scale_log2 - lse2[r]) : 0.f;
                s[j][2 * r] = p0 * (dp0 - delta_r[r]);
                s[j][2 * r + 1] = p1 * (dp1 - delta_r[r]);
            }
        }

        // dQ += dS K: dS (16 x BN) from registers, K (BN x D) from shared memory
#pragma unroll
        for (int kb = 0; kb < BN / 16; ++kb) {
            uint32_t da[4];
            da[0] = pack2<T>(s[2 * kb][0], s[2 * kb][1]);
            da[1] = pack2<T>(s[2 * kb][2], s[2 * kb][3]);
            da[2] = pack2<T>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
            da[3] = pack2<T>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
#pragma unroll
            for (int dn2 = 0; dn2 < D / 16; ++dn2) {
                uint32_t kb2[4];
                load_b_cols<D>(kb2, sK, kb * 16, dn2 * 16, lane);
                mma_16816<T>(dq_acc[2 * dn2], da, kb2[0], kb2[1]);
                mma_16816<T>(dq_acc[2 * dn2 + 1], da, kb2[2], kb2[3]);
            }
        }
        block_sync();  // every warp done with this stage before step nb + 1 refills it
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = m0 + warp * 16 + g + 8 * r;
        if (i < seq.len) {
            T* row = dq + i * p.dq_row_stride;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                store32(row + dn * 8 + 2 * t,
                        pack2<T>(dq_acc[dn][2 * r] * p.softmax_scale, dq_acc[dn][2 * r + 1] * p.softmax_scale));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Backward, kernel 2: dK and dV, per key block
// ---------------------------------------------------------------------------

// Block (bh, n_block) owns keys [64 n_block, +64) of one (batch, head); warp w owns
// keys 16w..16w+15 and works on transposed tiles (keys x queries):
//   S^T = K Q^T, P^T = exp2(S^T scale log2e - lse log2e), dP^T = V dO^T,
//   dV += (P^T z) dO, dS^T = P^T (dP^T z - D), dK += dS^T Q.
// Keys are not masked inside the loop: a masked key's row of P^T reaches only its own
// rows of dK and dV, which are set to 0 at the end (with a select, so inf/NaN there
// cannot leak). Shared memory: K, V (64 rows each, whole loop), Q and dO (BM rows, two
// stages), lse and D of the BM queries (two stages).
template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const AttentionParams p) {
    constexpr int BN = DkvTile<D>::kBlockN;  // keys per block
    constexpr int BM = DkvTile<D>::kBlockM;  // queries per step
    static_assert(BN == 16 * kWarps && BM % 16 == 0 && D % 16 == 0, "tile shape");
    static_assert(BM <= kThreads, "one thread per query row loads lse and D");

    T* sK = reinterpret_cast<T*>(dynamic_smem());
    T* sV = sK + BN * (D + kSmemPad);
    T* sQ0 = sV + BN * (D + kSmemPad);            // stage s: sQ0 + s * BM * (D + pad)
    T* sdO0 = sQ0 + 2 * BM * (D + kSmemPad);
    float* s_lse2 = reinterpret_cast<float*>(sdO0 + 2 * BM * (D + kSmemPad));  // [2][BM], base-2 units
    float* s_delta = s_lse2 + 2 * BM;                                           // [2][BM]

    const int bh = blockIdx.x;
    const int b = bh / p.heads;
    const int h = bh % p.heads;
    const int n0 = blockIdx.y * BN;
    const Sequence seq = sequence_of(p, b);
    if (n0 >= seq.len) return;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;  // this lane's keys: rows g and g + 8 of the warp's 16
    const int t = lane & 3;   // this lane's queries: columns 2t, 2t + 1 of each 8

    const T* q = slice(static_cast<const T*>(p.q), b, h, seq, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
    const T* k = slice(static_cast<const T*>(p.k), b, h, seq, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    const T* v = slice(static_cast<const T*>(p.v), b, h, seq, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
    const T* dout = slice(static_cast<const T*>(p.dout), b, h, seq, p.do_batch_stride, p.do_row_stride,
                          p.do_head_stride);
    T* dk = slice(static_cast<T*>(p.dk), b, h, seq, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
    T* dv = slice(static_cast<T*>(p.dv), b, h, seq, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
    const int64_t stat_off = b * p.lse_batch_stride + h * p.lse_head_stride + seq.start;
    const float* lse = p.lse + stat_off;
    const float* delta = p.delta + stat_off;
    const uint8_t* mask = p.mask != nullptr ? p.mask + b * p.mask_batch_stride : nullptr;

    // Stage loader: Q, dO rows [m, m + BM) (async) and their lse, D (plain loads; rows
    // past the end get lse = +inf so P = 0, and D = 0).
    auto load_stage = [&](int stage, int m) {
        load_tile<BM, D>(sQ0 + stage * BM * (D + kSmemPad), q, p.q_row_stride, m, seq.len);
        load_tile<BM, D>(sdO0 + stage * BM * (D + kSmemPad), dout, p.do_row_stride, m, seq.len);
        if (tid < BM) {
            const int i = m + tid;
            s_lse2[stage * BM + tid] = i < seq.len ? lse[i] * kLog2e : INFINITY;
            s_delta[stage * BM + tid] = i < seq.len ? delta[i] : 0.f;
        }
    };

    load_tile<BN, D>(sK, k, p.k_row_stride, n0, seq.len);
    load_tile<BN, D>(sV, v, p.v_row_stride, n0, seq.len);
    load_stage(0, 0);
    cp_async_commit();
    const uint64_t seed = DROPOUT ? dropout_seed(p) : 0;

    float dk_acc[D / 8][4];
    float dv_acc[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dk_acc[dn][e] = 0.f;
            dv_acc[dn][e] = 0.f;
        }
    }
    const int key0 = n0 + warp * 16 + g;  // this lane's keys: key0, key0 + 8

    // A block of padding keys only gets dK = dV = 0 (the stores below): no query loop for it.
    const int m_blocks = any_real_key(mask, p.mask_row_stride, n0, BN, seq.len, lane) ? (seq.len + BM - 1) / BM : 0;
    if (m_blocks == 0) cp_async_wait<0>();  // the prologue's copies: landed before the block exits
    for (int mb = 0; mb < m_blocks; ++mb) {
        const int m = mb * BM;
        const int stage = mb & 1;
        if (mb + 1 < m_blocks) {
            load_stage(stage ^ 1, m + BM);  // last read in step mb - 1 (finished: trailing barrier)
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        block_sync();
        const T* sQ = sQ0 + stage * BM * (D + kSmemPad);
        const T* sdO = sdO0 + stage * BM * (D + kSmemPad);
        const float* lse2 = s_lse2 + stage * BM;
        const float* dlt = s_delta + stage * BM;

        // S^T = K Q^T and dP^T = V dO^T: 16 keys x BM queries per warp
        float st[BM / 8][4];
        float dpt[BM / 8][4];
#pragma unroll
        for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                st[j][e] = 0.f;
                dpt[j][e] = 0.f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t ka[4];
            uint32_t va[4];
            load_a<D>(ka, sK, warp * 16, kk * 16, lane);
            load_a<D>(va, sV, warp * 16, kk * 16, lane);
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                uint32_t qb[4];
                load_b_rows<D>(qb, sQ, np * 16, kk * 16, lane);
                mma_16816<T>(st[2 * np], ka, qb[0], qb[1]);
                mma_16816<T>(st[2 * np + 1], ka, qb[2], qb[3]);
                uint32_t db[4];
                load_b_rows<D>(db, sdO, np * 16, kk * 16, lane);
                mma_16816<T>(dpt[2 * np], va, db[0], db[1]);
                mma_16816<T>(dpt[2 * np + 1], va, db[2], db[3]);
            }
        }

        // P^T, and in place: st <- dS^T, dpt <- P^T z (the dropped, rescaled probabilities)
        uint32_t keep[2] = {~0u, ~0u};  // bit 2j + c: query m + 8j + 2t + c, key key0 + 8r
        if (DROPOUT) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                keep[r] = dropout_bits_col<BM>(seed, b, h, m + 2 * t, key0 + 8 * r, p.dropout_threshold);
            }
        }
#pragma unroll
        for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int col = 8 * j + 2 * t + c;  // query m + col
                const float l2 = lse2[col];
                const float dl = dlt[col];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int e = 2 * r + c;  // row key0 + 8r, column col
                    const float pt = exp2f(st[j][e] * p.scale_log2 - l2);
                    float dpv = dpt[j][e];
                    float pz = pt;
                    if (DROPOUT) {
                        const bool kept = (keep[r] >> (2 * j + c)) & 1u;
                        pz = kept ? pt * p.dropout_scale : 0.f;
                        dpv = kept ? dpv * p.dropout_scale : 0.f;
                    }
                    st[j][e] = pt * (dpv - dl);
                    dpt[j][e] = pz;
                }
            }
        }

        // dV += (P^T z) dO and dK += dS^T Q: A from registers, B = dO / Q tiles (BM x D)
#pragma unroll
        for (int kb = 0; kb < BM / 16; ++kb) {
            uint32_t pa[4];
            pa[0] = pack2<T>(dpt[2 * kb][0], dpt[2 * kb][1]);
            pa[1] = pack2<T>(dpt[2 * kb][2], dpt[2 * kb][3]);
            pa[2] = pack2<T>(dpt[2 * kb + 1][0], dpt[2 * kb + 1][1]);
            pa[3] = pack2<T>(dpt[2 * kb + 1][2], dpt[2 * kb + 1][3]);
            uint32_t sa[4];
            sa[0] = pack2<T>(st[2 * kb][0], st[2 * kb][1]);
            sa[1] = pack2<T>(st[2 * kb][2], st[2 * kb][3]);
            sa[2] = pack2<T>(st[2 * kb + 1][0], st[2 * kb + 1][1]);
            sa[3] = pack2<T>(st[2 * kb + 1][2], st[2 * kb + 1][3]);
#pragma unroll
            for (int dn2 = 0; dn2 < D / 16; ++dn2) {
                uint32_t db[4];
                load_b_cols<D>(db, sdO, kb * 16, dn2 * 16, lane);
                mma_16816<T>(dv_acc[2 * dn2], pa, db[0], db[1]);
                mma_16816<T>(dv_acc[2 * dn2 + 1], pa, db[2], db[3]);
                uint32_t qb[4];
                load_b_cols<D>(qb, sQ, kb * 16, dn2 * 16, lane);
                mma_16816<T>(dk_acc[2 * dn2], sa, qb[0], qb[1]);
                mma_16816<T>(dk_acc[2 * dn2 + 1], sa, qb[2], qb[3]);
            }
        }
        block_sync();  // every warp done with this stage before step mb + 1 refills it
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key0 + 8 * r;
        if (key < seq.len) {
            const bool real = key_valid(mask, p.mask_row_stride, key, seq.len);
            T* dkrow = dk + key * p.dk_row_stride;
            T* dvrow = dv + key * p.dv_row_stride;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                const float k0v = real ? dk_acc[dn][2 * r] * p.softmax_scale : 0.f;
                const float k1v = real ? dk_acc[dn][2 * r + 1] * p.softmax_scale : 0.f;
                const float v0v = real ? dv_acc[dn][2 * r] : 0.f;
                const float v1v = real ? dv_acc[dn][2 * r + 1] : 0.f;
                store32(dkrow + dn * 8 + 2 * t, pack2<T>(k0v, k1v));
                store32(dvrow + dn * 8 + 2 * t, pack2<T>(v0v, v1v));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Launch templates (instantiated by attention_fwd_*.cu / attention_bwd_*.cu)
// ---------------------------------------------------------------------------

template <typename T, int D> constexpr size_t fwd_smem_bytes() {
    return tile_bytes<D, FwdTile<D>::kBlockM, T>() + 2 * tile_bytes<D, FwdTile<D>::kBlockN, T>();
}
template <typename T, int D> constexpr size_t dq_smem_bytes() {
    return 2 * tile_bytes<D, DqTile<D>::kBlockM, T>() + 4 * tile_bytes<D, DqTile<D>::kBlockN, T>() +
           DqTile<D>::kBlockM * sizeof(float);
}
template <typename T, int D> constexpr size_t dkdv_smem_bytes() {
    return 2 * tile_bytes<D, DkvTile<D>::kBlockN, T>() + 4 * tile_bytes<D, DkvTile<D>::kBlockM, T>() +
           4 * DkvTile<D>::kBlockM * sizeof(float);
}

// grid: x = batch * heads, y = row blocks (x allows 2^31 - 1 blocks, y only 65535).
inline dim3 attention_grid(const AttentionParams& p, int block_rows) {
    const int64_t bh = static_cast<int64_t>(p.batch) * p.heads;
    const int64_t blocks = (static_cast<int64_t>(p.seqlen) + block_rows - 1) / block_rows;
    if (bh > 0x7fffffff || blocks > 65535) {
        throw std::runtime_error("fastbert attention: batch * heads = " + std::to_string(bh) + " or seqlen = " +
                                 std::to_string(p.seqlen) + " is too large for one launch");
    }
    return dim3(static_cast<unsigned>(bh), static_cast<unsigned>(blocks), 1);
}

inline bool attention_empty(const AttentionParams& p) {
    return p.batch <= 0 || p.heads <= 0 || p.seqlen <= 0;
}

#if !defined(FASTBERT_ATTN_EMULATE)  // the CPU emulation (tests/cuda_emu) runs the kernels itself
// Launch one kernel with `smem` bytes of dynamic shared memory (raising the kernel's
// limit above the default 48 KB first) and check both the setup and the launch.
template <typename Kernel>
inline void launch_checked(Kernel kernel, const char* name, dim3 grid, size_t smem, const AttentionParams& p) {
    int device = 0;
    FASTBERT_CUDA_CHECK(cudaGetDevice(&device));  // a clear error when there is no GPU or driver
    if (smem > 48 * 1024) {
        FASTBERT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem)));
    }
    kernel<<<grid, kThreads, smem, p.stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) raise_cuda_error(err, name, __FILE__, __LINE__);
}

template <typename T, int D>
void run_attention_fwd(const AttentionParams& p) {
    if (attention_empty(p)) return;
    const dim3 grid = attention_grid(p, FwdTile<D>::kBlockM);
    constexpr size_t smem = fwd_smem_bytes<T, D>();
    if (p.dropout) {
        launch_checked(attention_fwd_kernel<T, D, true>, "attention_fwd_kernel", grid, smem, p);
    } else {
        launch_checked(attention_fwd_kernel<T, D, false>, "attention_fwd_kernel", grid, smem, p);
    }
}

// dQ kernel first: it writes D, which the dK/dV kernel reads (same stream, in order).
template <typename T, int D>
void run_attention_bwd(const AttentionParams& p) {
    if (attention_empty(p)) return;
    const dim3 grid_dq = attention_grid(p, DqTile<D>::kBlockM);
    const dim3 grid_dkdv = attention_grid(p, DkvTile<D>::kBlockN);
    constexpr size_t smem_dq = dq_smem_bytes<T, D>();
    constexpr size_t smem_dkdv = dkdv_smem_bytes<T, D>();
    if (p.dropout) {
        launch_checked(attention_bwd_dq_kernel<T, D, true>, "attention_bwd_dq_kernel", grid_dq, smem_dq, p);
        launch_checked(attention_bwd_dkdv_kernel<T, D, true>, "attention_bwd_dkdv_kernel", grid_dkdv, smem_dkdv, p);
    } else {
        launch_checked(attention_bwd_dq_kernel<T, D, false>, "attention_bwd_dq_kernel", grid_dq, smem_dq, p);
        launch_checked(attention_bwd_dkdv_kernel<T, D, false>, "attention_bwd_dkdv_kernel", grid_dkdv, smem_dkdv, p);
    }
}

#endif  // !FASTBERT_ATTN_EMULATE

}  // namespace attn
}  // namespace fastbert

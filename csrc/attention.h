// Flash attention (CUDA C++): the launch struct and the launchers' declarations.
//
// No torch types (fastbert.h: one build serves torch 2.11 to 2.13). The device code
// is in attention.cuh, the launchers (one per dtype x head dim) in
// attention_fwd_*.cu / attention_bwd_*.cu, the binding in attention_bind.cpp.
//
// Layouts (elements, not bytes; every last dimension has stride 1):
//   q, k, v, out, dout, dq, dk, dv: (batch, seqlen, heads, head_dim), any batch /
//     seq / head strides, or packed (total_tokens, heads, head_dim) with
//     cu_seqlens (batch + 1,) int32 and batch stride 0.
//   out_residual: out's rounding residual, out's dtype and strides, or null (see
//     attention.cuh: the backward's D_i from the fp32 output).
//   lse, delta: fp32 (batch, heads, seqlen), or (heads, total_tokens) packed
//     (batch stride 0); the token stride is 1.
//   mask: uint8 (batch, seqlen), 1 = real key; null = no mask. Packed mode has no mask.
#pragma once

#include <cstdint>

#include "fastbert.h"

namespace fastbert {

struct AttentionParams {
    // ---- tensors (device pointers)
    const void* q;
    const void* k;
    const void* v;
    void* out;                 // forward: written; backward: read (rowsum(dout * out))
    void* out_residual;        // null, or forward: written, fp32 out - out; backward: read (added to out for D)
    float* lse;                // forward: written; backward: read
    const void* dout;          // backward only
    void* dq;                  // backward only
    void* dk;                  // backward only
    void* dv;                  // backward only
    float* delta;              // backward only: rowsum(dout * out), lse's layout
    const uint8_t* mask;       // (batch, seqlen) uint8 key mask, or null
    const int32_t* cu_seqlens; // (batch + 1,) int32 offsets (packed mode), or null
    const int64_t* seed_ptr;   // dropout seed read on the device (compiled graphs), or null: use `seed`

    // ---- strides in elements: (batch, seq, head); batch stride 0 in packed mode
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int64_t do_batch_stride, do_row_stride, do_head_stride;
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
    int64_t lse_batch_stride, lse_head_stride;   // delta shares these
    int64_t mask_batch_stride, mask_row_stride;

    // ---- sizes
    int batch;                 // B (number of sequences in packed mode)
    int heads;                 // H
    int seqlen;                // S, or max_seqlen in packed mode (grid size only)
    int head_dim;              // D: 32, 64 or 128

    // ---- scalars
    float softmax_scale;       // scale applied to q.k
    float scale_log2;          // softmax_scale * log2(e): scores in base-2 units
    uint64_t seed;             // dropout seed (Philox key) when seed_ptr is null
    uint32_t dropout_threshold;// keep when (philox word >> 1) >= this; round(p * 2^31)
    float dropout_scale;       // 1 / (1 - dropout_p)
    bool dropout;              // dropout_p > 0

    DType dtype;               // q, k, v, out, dout, dq, dk, dv: kFloat16 or kBFloat16
    cudaStream_t stream;
};

// Head dims with kernels; float16 and bfloat16 only (float32: the Triton or torch backend).
constexpr int kAttentionHeadDims[] = {32, 64, 128};

// Dispatchers (attention_bind.cpp): check dtype and head_dim, pick the launcher below.
void attention_fwd(const AttentionParams& params);
void attention_bwd(const AttentionParams& params);

// Launchers, one per (dtype, head dim), each defined in its own .cu file. They
// throw std::runtime_error with the CUDA error text on failure (no device, bad
// launch, ...); a fault inside a kernel surfaces at the next synchronising call.
#define FASTBERT_ATTENTION_DECLARE(NAME)                          \
    void attention_fwd_##NAME(const AttentionParams& params);     \
    void attention_bwd_##NAME(const AttentionParams& params);
FASTBERT_ATTENTION_DECLARE(fp16_hdim32)
FASTBERT_ATTENTION_DECLARE(fp16_hdim64)
FASTBERT_ATTENTION_DECLARE(fp16_hdim128)
FASTBERT_ATTENTION_DECLARE(bf16_hdim32)
FASTBERT_ATTENTION_DECLARE(bf16_hdim64)
FASTBERT_ATTENTION_DECLARE(bf16_hdim128)
#undef FASTBERT_ATTENTION_DECLARE

// Debug launcher: keep[b, h, i, j] (uint8, contiguous (batch, heads, seqlen, seqlen)) =
// 1 where the kernels keep probability (b, h, i, j) for this seed and threshold.
void attention_dropout_mask(uint8_t* keep, int batch, int heads, int seqlen, uint64_t seed,
                            uint32_t dropout_threshold, cudaStream_t stream);

// The same mask computed on the host (for CPU tests of the Philox stream).
void attention_dropout_mask_host(uint8_t* keep, int batch, int heads, int seqlen, uint64_t seed,
                                 uint32_t dropout_threshold);

}  // namespace fastbert

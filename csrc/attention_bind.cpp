// Python binding of the attention launchers: bind_attention(m), called by bindings.cpp.
//
// Tensors cross as integers: a tensor is (data_ptr, stride_batch, stride_seq, stride_head)
// in elements (packed mode: stride_batch 0; out_residual: (0, ...) for none, else out's
// strides), lse / delta as (data_ptr, stride_batch, stride_head), the mask as (data_ptr
// or 0, stride_batch, stride_seq); the stream is torch.cuda.current_stream().cuda_stream.
// fastbert/ops/attention.py checks every tensor (device, dtype, shape, strides, alignment)
// before calling; the checks here only guard the raw call. The GIL is released while the
// launchers run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <string>

#include "attention.h"

namespace py = pybind11;

namespace fastbert {

namespace {

using Tensor4 = std::array<int64_t, 4>;  // (data_ptr, stride_b, stride_s, stride_h)
using Tensor3 = std::array<int64_t, 3>;  // lse: (data_ptr, stride_b, stride_h); mask: (data_ptr, stride_b, stride_s)

bool aligned(int64_t address, int64_t bytes) { return address % bytes == 0; }

// A (batch, seq, head, head_dim) operand: 16-byte aligned rows (cp.async, vector loads).
void check_tensor(const Tensor4& t, const char* name) {
    FASTBERT_CHECK_ARG(t[0] != 0, std::string("attention: ") + name + " is a null pointer");
    FASTBERT_CHECK_ARG(aligned(t[0], 16), std::string("attention: ") + name + " must be 16-byte aligned");
    for (int d = 1; d < 4; ++d) {
        FASTBERT_CHECK_ARG(t[d] % 8 == 0, std::string("attention: the strides of ") + name +
                                              " must be multiples of 8 elements, got " + std::to_string(t[d]));
    }
}

void check_common(int batch, int heads, int seqlen, int head_dim, int dtype_code) {
    FASTBERT_CHECK_ARG(batch >= 0 && heads >= 0 && seqlen >= 0, "attention: negative size");
    const DType dtype = as_dtype(dtype_code, "dtype");
    FASTBERT_CHECK_ARG(dtype == DType::kFloat16 || dtype == DType::kBFloat16,
                       std::string("attention: the CUDA kernels take float16 or bfloat16, got ") +
                           dtype_name(dtype) + "; use the 'triton' or 'torch' backend for float32");
    FASTBERT_CHECK_ARG(head_dim == 32 || head_dim == 64 || head_dim == 128,
                       "attention: head_dim must be 32, 64 or 128, got " + std::to_string(head_dim));
}

void set_tensor(const Tensor4& t, const void** ptr, int64_t* sb, int64_t* ss, int64_t* sh) {
    *ptr = reinterpret_cast<const void*>(t[0]);
    *sb = t[1];
    *ss = t[2];
    *sh = t[3];
}

// Fields shared by the forward and the backward.
AttentionParams make_params(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor4& out,
                            const Tensor4& out_residual, const Tensor3& lse, const Tensor3& mask, int64_t cu_seqlens,
                            int64_t seed_ptr, int batch, int heads, int seqlen, int head_dim, int dtype,
                            double softmax_scale, double dropout_p, int64_t dropout_threshold, uint64_t seed,
                            int64_t stream) {
    check_common(batch, heads, seqlen, head_dim, dtype);
    check_tensor(q, "q");
    check_tensor(k, "k");
    check_tensor(v, "v");
    check_tensor(out, "out");
    if (out_residual[0] != 0) {
        check_tensor(out_residual, "out_residual");
        FASTBERT_CHECK_ARG(out_residual[1] == out[1] && out_residual[2] == out[2] && out_residual[3] == out[3],
                           "attention: out_residual must have out's strides");
    }
    FASTBERT_CHECK_ARG(lse[0] != 0 && aligned(lse[0], 4), "attention: lse must be a non-null fp32 pointer");
    FASTBERT_CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, "attention: dropout_p must be in [0, 1)");
    FASTBERT_CHECK_ARG(dropout_threshold >= 0 && dropout_threshold <= 0x7fffffff,
                       "attention: dropout_threshold must be in [0, 2^31)");
    FASTBERT_CHECK_ARG(cu_seqlens == 0 || mask[0] == 0, "attention: packed (cu_seqlens) mode takes no mask");

    AttentionParams p{};
    set_tensor(q, &p.q, &p.q_batch_stride, &p.q_row_stride, &p.q_head_stride);
    set_tensor(k, &p.k, &p.k_batch_stride, &p.k_row_stride, &p.k_head_stride);
    set_tensor(v, &p.v, &p.v_batch_stride, &p.v_row_stride, &p.v_head_stride);
    p.out = reinterpret_cast<void*>(out[0]);
    p.o_batch_stride = out[1];
    p.o_row_stride = out[2];
    p.o_head_stride = out[3];
    p.out_residual = reinterpret_cast<void*>(out_residual[0]);
    p.lse = reinterpret_cast<float*>(lse[0]);
    p.lse_batch_stride = lse[1];
    p.lse_head_stride = lse[2];
    p.mask = reinterpret_cast<const uint8_t*>(mask[0]);
    p.mask_batch_stride = mask[1];
    p.mask_row_stride = mask[2];
    p.cu_seqlens = reinterpret_cast<const int32_t*>(cu_seqlens);
    p.seed_ptr = reinterpret_cast<const int64_t*>(seed_ptr);
    p.batch = batch;
    p.heads = heads;
    p.seqlen = seqlen;
    p.head_dim = head_dim;
    p.softmax_scale = static_cast<float>(softmax_scale);
    p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
    p.seed = seed;
    p.dropout = dropout_p > 0.0;
    p.dropout_threshold = static_cast<uint32_t>(dropout_threshold);
    p.dropout_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.0f;
    p.dtype = static_cast<DType>(dtype);
    p.stream = as_stream(static_cast<std::uintptr_t>(stream));
    return p;
}

void fwd_binding(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor4& out,
                 const Tensor4& out_residual, const Tensor3& lse, const Tensor3& mask, int64_t cu_seqlens,
                 int64_t seed_ptr, int batch, int heads, int seqlen, int head_dim, int dtype, double softmax_scale,
                 double dropout_p, int64_t dropout_threshold, uint64_t seed, int64_t stream) {
    const AttentionParams p = make_params(q, k, v, out, out_residual, lse, mask, cu_seqlens, seed_ptr, batch, heads,
                                          seqlen, head_dim, dtype, softmax_scale, dropout_p, dropout_threshold, seed,
                                          stream);
    attention_fwd(p);
}

void bwd_binding(const Tensor4& dout, const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor4& out,
                 const Tensor4& out_residual, const Tensor3& lse, int64_t delta, const Tensor4& dq, const Tensor4& dk,
                 const Tensor4& dv,
                 const Tensor3& mask, int64_t cu_seqlens, int64_t seed_ptr, int batch, int heads, int seqlen,
                 int head_dim, int dtype, double softmax_scale, double dropout_p, int64_t dropout_threshold,
                 uint64_t seed, int64_t stream) {
    AttentionParams p = make_params(q, k, v, out, out_residual, lse, mask, cu_seqlens, seed_ptr, batch, heads, seqlen,
                                    head_dim, dtype, softmax_scale, dropout_p, dropout_threshold, seed, stream);
    check_tensor(dout, "dout");
    check_tensor(dq, "dq");
    check_tensor(dk, "dk");
    check_tensor(dv, "dv");
    FASTBERT_CHECK_ARG(delta != 0 && aligned(delta, 4), "attention: delta must be a non-null fp32 pointer");
    set_tensor(dout, &p.dout, &p.do_batch_stride, &p.do_row_stride, &p.do_head_stride);
    p.dq = reinterpret_cast<void*>(dq[0]);
    p.dq_batch_stride = dq[1];
    p.dq_row_stride = dq[2];
    p.dq_head_stride = dq[3];
    p.dk = reinterpret_cast<void*>(dk[0]);
    p.dk_batch_stride = dk[1];
    p.dk_row_stride = dk[2];
    p.dk_head_stride = dk[3];
    p.dv = reinterpret_cast<void*>(dv[0]);
    p.dv_batch_stride = dv[1];
    p.dv_row_stride = dv[2];
    p.dv_head_stride = dv[3];
    p.delta = reinterpret_cast<float*>(delta);
    attention_bwd(p);
}

}  // namespace

// Runtime (dtype, head_dim) -> the launcher compiled for it.
void attention_fwd(const AttentionParams& p) {
    const bool bf16 = p.dtype == DType::kBFloat16;
    switch (p.head_dim) {
        case 32: return bf16 ? attention_fwd_bf16_hdim32(p) : attention_fwd_fp16_hdim32(p);
        case 64: return bf16 ? attention_fwd_bf16_hdim64(p) : attention_fwd_fp16_hdim64(p);
        case 128: return bf16 ? attention_fwd_bf16_hdim128(p) : attention_fwd_fp16_hdim128(p);
        default: FASTBERT_CHECK_ARG(false, "attention: unsupported head_dim " + std::to_string(p.head_dim));
    }
}

void attention_bwd(const AttentionParams& p) {
    const bool bf16 = p.dtype == DType::kBFloat16;
    switch (p.head_dim) {
        case 32: return bf16 ? attention_bwd_bf16_hdim32(p) : attention_bwd_fp16_hdim32(p);
        case 64: return bf16 ? attention_bwd_bf16_hdim64(p) : attention_bwd_fp16_hdim64(p);
        case 128: return bf16 ? attention_bwd_bf16_hdim128(p) : attention_bwd_fp16_hdim128(p);
        default: FASTBERT_CHECK_ARG(false, "attention: unsupported head_dim " + std::to_string(p.head_dim));
    }
}

}  // namespace fastbert

void bind_attention(pybind11::module_& m) {
    using namespace pybind11::literals;
    m.def("attention_fwd", &fastbert::fwd_binding,
          "Flash attention forward: writes out (q's layout) and lse (fp32, natural log; +inf for a row\n"
          "whose keys are all masked), and out_residual = fp32 out - out unless its pointer is 0.\n"
          "q, k, v, out, out_residual: (ptr, stride_b, stride_s, stride_h) in elements;\n"
          "lse: (ptr, stride_b, stride_h); mask: (ptr or 0, stride_b, stride_s) uint8; cu_seqlens: int32\n"
          "pointer or 0; seed_ptr: int64 device pointer or 0 (then `seed`); dtype: 1 float16, 2 bfloat16.",
          "q"_a, "k"_a, "v"_a, "out"_a, "out_residual"_a, "lse"_a, "mask"_a, "cu_seqlens"_a, "seed_ptr"_a, "batch"_a,
          "heads"_a, "seqlen"_a, "head_dim"_a, "dtype"_a, "softmax_scale"_a, "dropout_p"_a, "dropout_threshold"_a,
          "seed"_a, "stream"_a, py::call_guard<py::gil_scoped_release>());
    m.def("attention_bwd", &fastbert::bwd_binding,
          "Flash attention backward: writes delta = rowsum(dout * (out + out_residual)) (lse's layout;\n"
          "out alone when out_residual's pointer is 0), then dq, dk, dv\n"
          "(two kernels, no atomics: deterministic). Arguments as attention_fwd; the forward's seed.",
          "dout"_a, "q"_a, "k"_a, "v"_a, "out"_a, "out_residual"_a, "lse"_a, "delta"_a, "dq"_a, "dk"_a, "dv"_a,
          "mask"_a, "cu_seqlens"_a, "seed_ptr"_a, "batch"_a, "heads"_a, "seqlen"_a, "head_dim"_a, "dtype"_a,
          "softmax_scale"_a, "dropout_p"_a, "dropout_threshold"_a, "seed"_a, "stream"_a,
          py::call_guard<py::gil_scoped_release>());
    m.def(
        "attention_dropout_mask",
        [](int64_t keep, int batch, int heads, int seqlen, uint64_t seed, int64_t dropout_threshold, int64_t stream) {
            FASTBERT_CHECK_ARG(keep != 0 || int64_t(batch) * heads * seqlen == 0, "attention: keep is a null pointer");
            fastbert::attention_dropout_mask(reinterpret_cast<uint8_t*>(keep), batch, heads, seqlen, seed,
                                             static_cast<uint32_t>(dropout_threshold),
                                             fastbert::as_stream(static_cast<std::uintptr_t>(stream)));
        },
        "Debug: writes keep (uint8, contiguous (batch, heads, seqlen, seqlen)) = 1 where the attention\n"
        "kernels keep probability (b, h, i, j) for this seed and threshold (device memory).",
        "keep"_a, "batch"_a, "heads"_a, "seqlen"_a, "seed"_a, "dropout_threshold"_a, "stream"_a,
        py::call_guard<py::gil_scoped_release>());
    m.def(
        "attention_dropout_mask_host",
        [](int64_t keep, int batch, int heads, int seqlen, uint64_t seed, int64_t dropout_threshold) {
            FASTBERT_CHECK_ARG(keep != 0 || int64_t(batch) * heads * seqlen == 0, "attention: keep is a null pointer");
            fastbert::attention_dropout_mask_host(reinterpret_cast<uint8_t*>(keep), batch, heads, seqlen, seed,
                                                  static_cast<uint32_t>(dropout_threshold));
        },
        "The same keep-mask computed on the host into CPU memory (no GPU needed): checks the Philox\n"
        "stream against the Triton backend's on any machine.",
        "keep"_a, "batch"_a, "heads"_a, "seqlen"_a, "seed"_a, "dropout_threshold"_a,
        py::call_guard<py::gil_scoped_release>());
}

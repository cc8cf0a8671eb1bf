// layernorm.cu: the add_layernorm / layernorm_gelu launchers (argument checks, dtype
// dispatch) and the dropout keep-mask kernel. The kernels and their configuration choice
// are in layernorm.cuh, instantiated per dtype in layernorm_{fwd,bwd}_{f32,f16,bf16}.cu.
#include "fastbert.h"

namespace fastbert {
namespace layernorm {

// Defined in layernorm.cuh, instantiated in the per-dtype files (declared only here, so
// this file does not compile the kernels a second time).
template <typename T, typename R, bool GELU>
void fwd_launch(const LayerNormFwdParams& p);
template <typename T, typename R, bool GELU>
void bwd_launch(const LayerNormBwdParams& p);

// ----------------------------------------------------------------------------- dropout mask (tests)

__global__ void __launch_bounds__(256) _add_layernorm_keep_kernel(const DropoutMaskParams p) {
  // Thread i (grid-stride) owns Philox group i: columns 4 * (i % groups) .. +3 of row i / groups,
  // the same (row, column) -> uniform map as the forward and backward kernels.
  const int64_t groups = (p.cols + 3) / 4;
  const int64_t total = p.rows * groups;
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / groups;
    const int64_t col = (i % groups) * 4;
    const uint4 r = philox4x32_10(seed, static_cast<uint64_t>(i));  // == row * groups + col / 4
    const uint32_t bits[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (col + c < p.cols) p.keep[row * p.cols + col + c] = uint_to_uniform(bits[c]) >= p.dropout_p ? 1 : 0;
    }
  }
}

// What the forward and backward parameters share.
template <typename Params>
void check_sizes_and_dtypes(const Params& p, const std::string& name, bool residual) {
  FASTBERT_CHECK_ARG(p.cols >= 1 && p.cols <= kLayerNormMaxCols,
                     name + ": cols (hidden size) must be in 1..4096, got " + std::to_string(p.cols));
  FASTBERT_CHECK_ARG(p.rows >= 0, name + ": rows must be >= 0");
  FASTBERT_CHECK_ARG(p.param_dtype == p.dtype || p.param_dtype == DType::kFloat32,
                     name + ": weight/bias must have x's dtype or float32");
  FASTBERT_CHECK_ARG(p.dropout_p >= 0.0f && p.dropout_p < 1.0f, name + ": dropout_p must be in [0, 1)");
  FASTBERT_CHECK_ARG(residual || p.dropout_p == 0.0f, name + ": has no dropout");
  FASTBERT_CHECK_ARG(p.residual_dtype == p.dtype ||
                         (residual && p.residual_dtype == DType::kFloat32 && p.dtype != DType::kFloat32),
                     name + (residual ? ": residual must have x's dtype, or float32 with float16/bfloat16 x"
                                      : ": residual_dtype must equal dtype"));
}

// T = x's type; the residual (and y, dy, dh) is T or, for half x, float (autocast's mix).
template <bool GELU, typename Params>
void dispatch(const Params& p, const char* op) {
  dispatch_dtype(p.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!GELU && !std::is_same<T, float>::value) {
      if (p.residual_dtype == DType::kFloat32) {
        if constexpr (std::is_same<Params, LayerNormFwdParams>::value) fwd_launch<T, float, false>(p);
        else bwd_launch<T, float, false>(p);
        return;
      }
    }
    if constexpr (std::is_same<Params, LayerNormFwdParams>::value) fwd_launch<T, T, GELU>(p);
    else bwd_launch<T, T, GELU>(p);
  });
}

void check_fwd(const LayerNormFwdParams& p, const char* op, bool residual) {
  const std::string name(op);
  check_sizes_and_dtypes(p, name, residual);
  if (p.rows == 0) return;
  FASTBERT_CHECK_ARG(p.x && p.weight && p.bias && p.y && p.mean && p.rstd,
                     name + ": x, weight, bias, y, mean, rstd must not be null");
  FASTBERT_CHECK_ARG(!residual || p.residual, name + ": residual must not be null");
  FASTBERT_CHECK_ARG(p.dropout_p == 0.0f || p.seed, name + ": seed must not be null when dropout_p > 0");
  FASTBERT_CHECK_ARG(p.stride_x >= p.cols && p.stride_y >= p.cols && (!residual || p.stride_r >= p.cols),
                     name + ": row strides must be >= cols");
  FASTBERT_CHECK_ARG(!p.y_copy || (residual && p.stride_y_copy >= p.cols),
                     name + (residual ? ": stride_y_copy must be >= cols" : ": has no y_copy"));
}

void check_bwd(const LayerNormBwdParams& p, const char* op, bool residual) {
  const std::string name(op);
  check_sizes_and_dtypes(p, name, residual);
  FASTBERT_CHECK_ARG(p.dweight && p.dbias, name + ": dweight and dbias must not be null");
  if (p.rows == 0) return;
  FASTBERT_CHECK_ARG(p.dy && p.x && p.weight && p.mean && p.rstd && p.dh && p.partial,
                     name + ": dy, x, weight, mean, rstd, dh, partial must not be null");
  FASTBERT_CHECK_ARG(residual || p.bias, name + ": bias must not be null");
  FASTBERT_CHECK_ARG(!residual || p.residual, name + ": residual must not be null");
  FASTBERT_CHECK_ARG(p.dropout_p == 0.0f || p.seed, name + ": seed must not be null when dropout_p > 0");
  const bool write_dx = p.dropout_p > 0.0f || p.residual_dtype != p.dtype;
  FASTBERT_CHECK_ARG(!write_dx || p.dx,
                     name + ": dx must not be null when dropout_p > 0 or the residual's dtype differs from x's");
  FASTBERT_CHECK_ARG(p.max_partials >= 1, name + ": max_partials must be >= 1");
  FASTBERT_CHECK_ARG(p.stride_dy >= p.cols && p.stride_x >= p.cols && p.stride_dh >= p.cols &&
                         (!residual || p.stride_r >= p.cols) && (!write_dx || p.stride_dx >= p.cols),
                     name + ": row strides must be >= cols");
  FASTBERT_CHECK_ARG(!p.dy_copy || (residual && p.stride_dy_copy >= p.cols),
                     name + (residual ? ": stride_dy_copy must be >= cols" : ": has no dy_copy"));
}

void zero_param_grads(const LayerNormBwdParams& p) {  // no rows: dweight = dbias = 0
  const size_t bytes = static_cast<size_t>(p.cols) * dtype_size(p.param_dtype);
  FASTBERT_CUDA_CHECK(cudaMemsetAsync(p.dweight, 0, bytes, p.stream));
  FASTBERT_CUDA_CHECK(cudaMemsetAsync(p.dbias, 0, bytes, p.stream));
}

}  // namespace layernorm

void add_layernorm_fwd(const LayerNormFwdParams& p) {
  layernorm::check_fwd(p, "add_layernorm_fwd", true);
  if (p.rows == 0) return;
  layernorm::dispatch<false>(p, "add_layernorm_fwd");
}

void layernorm_gelu_fwd(const LayerNormFwdParams& p) {
  layernorm::check_fwd(p, "layernorm_gelu_fwd", false);
  if (p.rows == 0) return;
  layernorm::dispatch<true>(p, "layernorm_gelu_fwd");
}

void add_layernorm_bwd(const LayerNormBwdParams& p) {
  layernorm::check_bwd(p, "add_layernorm_bwd", true);
  if (p.rows == 0) return layernorm::zero_param_grads(p);
  layernorm::dispatch<false>(p, "add_layernorm_bwd");
}

void layernorm_gelu_bwd(const LayerNormBwdParams& p) {
  layernorm::check_bwd(p, "layernorm_gelu_bwd", false);
  if (p.rows == 0) return layernorm::zero_param_grads(p);
  layernorm::dispatch<true>(p, "layernorm_gelu_bwd");
}

void add_layernorm_keep_mask(const DropoutMaskParams& p) {
  FASTBERT_CHECK_ARG(p.rows >= 0 && p.cols >= 1, "add_layernorm_keep_mask: rows must be >= 0 and cols >= 1");
  FASTBERT_CHECK_ARG(p.dropout_p >= 0.0f && p.dropout_p < 1.0f, "add_layernorm_keep_mask: dropout_p must be in [0, 1)");
  if (p.rows == 0) return;
  FASTBERT_CHECK_ARG(p.seed && p.keep, "add_layernorm_keep_mask: seed and keep must not be null");
  const int64_t total = p.rows * ((p.cols + 3) / 4);
  int64_t blocks = (total + 255) / 256;
  blocks = blocks < 65536 ? blocks : 65536;
  const auto kernel = layernorm::_add_layernorm_keep_kernel;
  FASTBERT_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(256), p.stream, p);
  FASTBERT_LAUNCH_CHECK("_add_layernorm_keep_kernel");
}

}  // namespace fastbert

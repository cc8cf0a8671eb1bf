// gelu.cu: the bias_gelu launchers and column_sums (kernels in gelu.cuh).
#include "gelu.cuh"

namespace fastbert {

namespace {

void check_bias_gelu(const BiasGeluParams& p, bool backward) {
  const char* op = backward ? "bias_gelu_bwd" : "bias_gelu_fwd";
  FASTBERT_CHECK_ARG(p.rows >= 0 && p.cols >= 0, std::string(op) + ": rows and cols must be >= 0");
  FASTBERT_CHECK_ARG(p.bias_dtype == p.dtype || p.bias_dtype == DType::kFloat32,
                     std::string(op) + ": bias must have x's dtype or float32");
  if (p.rows == 0 || p.cols == 0) return;
  FASTBERT_CHECK_ARG(p.x && p.bias, std::string(op) + ": x and bias must not be null");
  FASTBERT_CHECK_ARG(p.stride_x >= p.cols && p.stride_out >= p.cols, std::string(op) + ": row strides must be >= cols");
  if (backward) {
    FASTBERT_CHECK_ARG(p.dy && p.dx && p.partial && p.dbias, std::string(op) + ": dy, dx, partial, dbias must not be null");
    FASTBERT_CHECK_ARG(p.stride_dy >= p.cols, std::string(op) + ": dy's row stride must be >= cols");
    FASTBERT_CHECK_ARG(p.max_partials >= 1, std::string(op) + ": max_partials must be >= 1");
  } else {
    FASTBERT_CHECK_ARG(p.y != nullptr, std::string(op) + ": y must not be null");
  }
}

}  // namespace

void bias_gelu_fwd(const BiasGeluParams& p) {
  check_bias_gelu(p, false);
  if (p.rows == 0 || p.cols == 0) return;
  dispatch_dtype(p.dtype, "bias_gelu_fwd", [&](auto tag) {
    bias_gelu::launch<typename decltype(tag)::type>(p, false);
  });
}

void bias_gelu_bwd(const BiasGeluParams& p) {
  check_bias_gelu(p, true);
  if (p.cols == 0) return;
  if (p.rows == 0) {  // no rows: dbias = 0
    FASTBERT_CUDA_CHECK(cudaMemsetAsync(p.dbias, 0, p.cols * dtype_size(p.bias_dtype), p.stream));
    return;
  }
  dispatch_dtype(p.dtype, "bias_gelu_bwd", [&](auto tag) {
    bias_gelu::launch<typename decltype(tag)::type>(p, true);
  });
}

void column_sums(const float* partial, int64_t partial_rows, int64_t groups, int64_t cols, int sets, void* out0,
                 void* out1, DType out_dtype, cudaStream_t stream) {
  FASTBERT_CHECK_ARG(sets == 1 || sets == 2, "column_sums: sets must be 1 or 2");
  FASTBERT_CHECK_ARG(groups >= 1 && groups <= partial_rows, "column_sums: groups must be in 1..partial_rows");
  if (cols == 0) return;
  const int64_t blocks = (cols + 31) / 32;
  FASTBERT_CHECK_ARG(blocks <= INT32_MAX, "column_sums: too many columns");
  const dim3 grid(static_cast<unsigned>(blocks), sets);
  const dim3 block(32, 8);
  dispatch_dtype(out_dtype, "column_sums", [&](auto tag) {
    using OutT = typename decltype(tag)::type;
    const auto kernel = _column_sums_kernel<OutT>;
    FASTBERT_LAUNCH(kernel, grid, block, stream, partial, partial_rows, groups, cols, out0, out1);
    FASTBERT_LAUNCH_CHECK("_column_sums_kernel");
  });
}

}  // namespace fastbert

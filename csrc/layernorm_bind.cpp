// Python binding of the LayerNorm-family launchers: bind_layernorm(m), called by bindings.cpp.
//
// Tensors cross as integers (tensor.data_ptr()) with their row strides in elements; the
// stream is torch.cuda.current_stream().cuda_stream; dtypes are codes 0 float32,
// 1 float16, 2 bfloat16. fastbert/ops/_cuda.py checks every tensor (device, dtype,
// shape, contiguity) before calling; the launchers re-check what a raw call could get
// wrong. The GIL is released while a launcher runs.
#include <pybind11/pybind11.h>

#include "fastbert.h"

namespace py = pybind11;
using namespace pybind11::literals;
using std::uintptr_t;

namespace fastbert {
namespace {

LayerNormFwdParams fwd_params(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t seed,
                              uintptr_t y, uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t cols,
                              int64_t stride_x, int64_t stride_r, int64_t stride_y, double eps, double dropout_p,
                              int dtype, int param_dtype, uintptr_t stream, int residual_dtype = -1,
                              uintptr_t y_copy = 0, int64_t stride_y_copy = 0) {
  LayerNormFwdParams p{};
  p.y_copy = as_ptr<void>(y_copy);
  p.stride_y_copy = stride_y_copy;
  p.x = as_ptr<const void>(x);
  p.residual = as_ptr<const void>(residual);
  p.weight = as_ptr<const void>(weight);
  p.bias = as_ptr<const void>(bias);
  p.seed = as_ptr<const int64_t>(seed);
  p.y = as_ptr<void>(y);
  p.mean = as_ptr<float>(mean);
  p.rstd = as_ptr<float>(rstd);
  p.rows = rows;
  p.cols = cols;
  p.stride_x = stride_x;
  p.stride_r = stride_r;
  p.stride_y = stride_y;
  p.eps = static_cast<float>(eps);
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_scale = dropout_p > 0.0 && dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.0f;
  p.dtype = as_dtype(dtype, "dtype");
  p.param_dtype = as_dtype(param_dtype, "param_dtype");
  p.residual_dtype = residual_dtype < 0 ? p.dtype : as_dtype(residual_dtype, "residual_dtype");
  p.stream = as_stream(stream);
  return p;
}

LayerNormBwdParams bwd_params(uintptr_t dy, uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias,
                              uintptr_t mean, uintptr_t rstd, uintptr_t seed, uintptr_t dh, uintptr_t dx,
                              uintptr_t partial, uintptr_t dweight, uintptr_t dbias, int64_t rows, int64_t cols,
                              int64_t stride_dy, int64_t stride_x, int64_t stride_r, int64_t stride_dh,
                              int64_t stride_dx, int64_t max_partials, double dropout_p, int dtype, int param_dtype,
                              uintptr_t stream, int residual_dtype = -1, uintptr_t dy_copy = 0,
                              int64_t stride_dy_copy = 0) {
  LayerNormBwdParams p{};
  p.dy_copy = as_ptr<const void>(dy_copy);
  p.stride_dy_copy = stride_dy_copy;
  p.dy = as_ptr<const void>(dy);
  p.x = as_ptr<const void>(x);
  p.residual = as_ptr<const void>(residual);
  p.weight = as_ptr<const void>(weight);
  p.bias = as_ptr<const void>(bias);
  p.mean = as_ptr<const float>(mean);
  p.rstd = as_ptr<const float>(rstd);
  p.seed = as_ptr<const int64_t>(seed);
  p.dh = as_ptr<void>(dh);
  p.dx = as_ptr<void>(dx);
  p.partial = as_ptr<float>(partial);
  p.dweight = as_ptr<void>(dweight);
  p.dbias = as_ptr<void>(dbias);
  p.rows = rows;
  p.cols = cols;
  p.stride_dy = stride_dy;
  p.stride_x = stride_x;
  p.stride_r = stride_r;
  p.stride_dh = stride_dh;
  p.stride_dx = stride_dx;
  p.max_partials = max_partials;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_scale = dropout_p > 0.0 && dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.0f;
  p.dtype = as_dtype(dtype, "dtype");
  p.param_dtype = as_dtype(param_dtype, "param_dtype");
  p.residual_dtype = residual_dtype < 0 ? p.dtype : as_dtype(residual_dtype, "residual_dtype");
  p.stream = as_stream(stream);
  return p;
}

}  // namespace
}  // namespace fastbert

void bind_layernorm(pybind11::module_& m) {
  using fastbert::bwd_params;
  using fastbert::fwd_params;
  const auto release = py::call_guard<py::gil_scoped_release>();

  m.def(
      "add_layernorm_fwd",
      [](uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t seed, uintptr_t y,
         uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t cols, int64_t stride_x, int64_t stride_r,
         int64_t stride_y, double eps, double dropout_p, int dtype, int param_dtype, uintptr_t stream,
         int residual_dtype, uintptr_t y_copy, int64_t stride_y_copy) {
        fastbert::add_layernorm_fwd(fwd_params(x, residual, weight, bias, seed, y, mean, rstd, rows, cols, stride_x,
                                               stride_r, stride_y, eps, dropout_p, dtype, param_dtype, stream,
                                               residual_dtype, y_copy, stride_y_copy));
      },
      "y = LayerNorm(dropout(x) + residual) over rows of `cols`; writes y (rows, cols) and fp32 mean, rstd (rows,).\n"
      "x: dtype; residual, y: residual_dtype (-1: dtype; float32 with float16/bfloat16 x, autocast's mix);\n"
      "weight, bias: param_dtype (dtype or float32); seed: (1,) int64, read when dropout_p > 0;\n"
      "y_copy: optional (0 = none) second output, y in dtype (what the next Linear reads under autocast).",
      "x"_a, "residual"_a, "weight"_a, "bias"_a, "seed"_a, "y"_a, "mean"_a, "rstd"_a, "rows"_a, "cols"_a,
      "stride_x"_a, "stride_r"_a, "stride_y"_a, "eps"_a, "dropout_p"_a, "dtype"_a, "param_dtype"_a, "stream"_a,
      "residual_dtype"_a = -1, "y_copy"_a = 0, "stride_y_copy"_a = 0, release);

  m.def(
      "layernorm_gelu_fwd",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t mean, uintptr_t rstd, int64_t rows,
         int64_t cols, int64_t stride_x, int64_t stride_y, double eps, int dtype, int param_dtype, uintptr_t stream) {
        fastbert::layernorm_gelu_fwd(fwd_params(x, 0, weight, bias, 0, y, mean, rstd, rows, cols, stride_x, 0,
                                                stride_y, eps, 0.0, dtype, param_dtype, stream));
      },
      "y = GELU(LayerNorm(x)) (erf GELU) over rows of `cols`; writes y and fp32 mean, rstd (rows,).",
      "x"_a, "weight"_a, "bias"_a, "y"_a, "mean"_a, "rstd"_a, "rows"_a, "cols"_a, "stride_x"_a, "stride_y"_a,
      "eps"_a, "dtype"_a, "param_dtype"_a, "stream"_a, release);

  m.def(
      "add_layernorm_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t mean, uintptr_t rstd,
         uintptr_t seed, uintptr_t dh, uintptr_t dx, uintptr_t partial, uintptr_t dweight, uintptr_t dbias,
         int64_t rows, int64_t cols, int64_t stride_dy, int64_t stride_x, int64_t stride_r, int64_t stride_dh,
         int64_t stride_dx, int64_t max_partials, double dropout_p, int dtype, int param_dtype, uintptr_t stream,
         int residual_dtype, uintptr_t dy_copy, int64_t stride_dy_copy) {
        fastbert::add_layernorm_bwd(bwd_params(dy, x, residual, weight, 0, mean, rstd, seed, dh, dx, partial, dweight,
                                               dbias, rows, cols, stride_dy, stride_x, stride_r, stride_dh, stride_dx,
                                               max_partials, dropout_p, dtype, param_dtype, stream, residual_dtype,
                                               dy_copy, stride_dy_copy));
      },
      "Gradients of add_layernorm: dh (= dresidual; residual_dtype, as dy) always, dx = dh * keep / (1 - p)\n"
      "(dtype) only when dropout_p > 0 or residual_dtype differs from dtype; dy_copy (optional, dtype): the\n"
      "gradient of the forward's y_copy, added to dy;\n"
      "dweight, dbias (param_dtype) through `partial`, fp32 scratch of (2, max_partials, cols).",
      "dy"_a, "x"_a, "residual"_a, "weight"_a, "mean"_a, "rstd"_a, "seed"_a, "dh"_a, "dx"_a, "partial"_a,
      "dweight"_a, "dbias"_a, "rows"_a, "cols"_a, "stride_dy"_a, "stride_x"_a, "stride_r"_a, "stride_dh"_a,
      "stride_dx"_a, "max_partials"_a, "dropout_p"_a, "dtype"_a, "param_dtype"_a, "stream"_a,
      "residual_dtype"_a = -1, "dy_copy"_a = 0, "stride_dy_copy"_a = 0, release);

  m.def(
      "layernorm_gelu_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t rstd, uintptr_t dx,
         uintptr_t partial, uintptr_t dweight, uintptr_t dbias, int64_t rows, int64_t cols, int64_t stride_dy,
         int64_t stride_x, int64_t stride_dx, int64_t max_partials, int dtype, int param_dtype, uintptr_t stream) {
        fastbert::layernorm_gelu_bwd(bwd_params(dy, x, 0, weight, bias, mean, rstd, 0, dx, 0, partial, dweight, dbias,
                                                rows, cols, stride_dy, stride_x, 0, stride_dx, 0, max_partials, 0.0,
                                                dtype, param_dtype, stream));
      },
      "Gradients of layernorm_gelu: dx (dtype), dweight, dbias (param_dtype) through `partial`, fp32 scratch of\n"
      "(2, max_partials, cols).",
      "dy"_a, "x"_a, "weight"_a, "bias"_a, "mean"_a, "rstd"_a, "dx"_a, "partial"_a, "dweight"_a, "dbias"_a,
      "rows"_a, "cols"_a, "stride_dy"_a, "stride_x"_a, "stride_dx"_a, "max_partials"_a, "dtype"_a, "param_dtype"_a,
      "stream"_a, release);

  m.def(
      "add_layernorm_keep_mask",
      [](uintptr_t seed, uintptr_t keep, int64_t rows, int64_t cols, double dropout_p, uintptr_t stream) {
        fastbert::DropoutMaskParams p{};
        p.seed = fastbert::as_ptr<const int64_t>(seed);
        p.keep = fastbert::as_ptr<int8_t>(keep);
        p.rows = rows;
        p.cols = cols;
        p.dropout_p = static_cast<float>(dropout_p);
        p.stream = fastbert::as_stream(stream);
        fastbert::add_layernorm_keep_mask(p);
      },
      "The kept-mask add_layernorm uses for this seed and dropout_p: keep (rows, cols) int8, 1 = kept.",
      "seed"_a, "keep"_a, "rows"_a, "cols"_a, "dropout_p"_a, "stream"_a, release);
}

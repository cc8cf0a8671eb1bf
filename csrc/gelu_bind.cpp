// Python binding of the bias_gelu launchers: bind_gelu(m), called by bindings.cpp.
// Conventions as in layernorm_bind.cpp (pointers, strides in elements, stream and dtype
// codes as integers; the GIL is released while a launcher runs).
#include <pybind11/pybind11.h>

#include <string>

#include "fastbert.h"

namespace py = pybind11;
using namespace pybind11::literals;
using std::uintptr_t;

namespace {

bool parse_approximate(const std::string& approximate) {
  FASTBERT_CHECK_ARG(approximate == "none" || approximate == "tanh",
                     "bias_gelu: approximate must be 'none' or 'tanh', got '" + approximate + "'");
  return approximate == "tanh";
}

}  // namespace

void bind_gelu(pybind11::module_& m) {
  m.def(
      "bias_gelu_fwd",
      [](uintptr_t x, uintptr_t bias, uintptr_t y, int64_t rows, int64_t cols, int64_t stride_x, int64_t stride_y,
         const std::string& approximate, int dtype, int bias_dtype, uintptr_t stream) {
        fastbert::BiasGeluParams p{};
        p.approximate_tanh = parse_approximate(approximate);
        p.x = fastbert::as_ptr<const void>(x);
        p.bias = fastbert::as_ptr<const void>(bias);
        p.y = fastbert::as_ptr<void>(y);
        p.rows = rows;
        p.cols = cols;
        p.stride_x = stride_x;
        p.stride_out = stride_y;
        p.dtype = fastbert::as_dtype(dtype, "dtype");
        p.bias_dtype = fastbert::as_dtype(bias_dtype, "bias_dtype");
        p.stream = fastbert::as_stream(stream);
        fastbert::bias_gelu_fwd(p);
      },
      "y = GELU(x + bias) over (rows, cols); approximate 'none' (erf) or 'tanh'; bias: dtype or float32.",
      "x"_a, "bias"_a, "y"_a, "rows"_a, "cols"_a, "stride_x"_a, "stride_y"_a, "approximate"_a, "dtype"_a,
      "bias_dtype"_a, "stream"_a, py::call_guard<py::gil_scoped_release>());

  m.def(
      "bias_gelu_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dx, uintptr_t partial, uintptr_t dbias, int64_t rows,
         int64_t cols, int64_t stride_dy, int64_t stride_x, int64_t stride_dx, int64_t max_partials,
         const std::string& approximate, int dtype, int bias_dtype, uintptr_t stream) {
        fastbert::BiasGeluParams p{};
        p.approximate_tanh = parse_approximate(approximate);
        p.dy = fastbert::as_ptr<const void>(dy);
        p.x = fastbert::as_ptr<const void>(x);
        p.bias = fastbert::as_ptr<const void>(bias);
        p.dx = fastbert::as_ptr<void>(dx);
        p.partial = fastbert::as_ptr<float>(partial);
        p.dbias = fastbert::as_ptr<void>(dbias);
        p.rows = rows;
        p.cols = cols;
        p.stride_dy = stride_dy;
        p.stride_x = stride_x;
        p.stride_out = stride_dx;
        p.max_partials = max_partials;
        p.dtype = fastbert::as_dtype(dtype, "dtype");
        p.bias_dtype = fastbert::as_dtype(bias_dtype, "bias_dtype");
        p.stream = fastbert::as_stream(stream);
        fastbert::bias_gelu_bwd(p);
      },
      "dx = dy * GELU'(x + bias), dbias = sum over rows of dx (bias_dtype), through `partial`, fp32 scratch of\n"
      "(max_partials, cols).",
      "dy"_a, "x"_a, "bias"_a, "dx"_a, "partial"_a, "dbias"_a, "rows"_a, "cols"_a, "stride_dy"_a, "stride_x"_a,
      "stride_dx"_a, "max_partials"_a, "approximate"_a, "dtype"_a, "bias_dtype"_a, "stream"_a,
      py::call_guard<py::gil_scoped_release>());
}

// fastbert._C: the CUDA C++ kernels of csrc/, bound with pybind11.
//
// Every launcher takes device pointers, sizes and 64-bit strides as integers and the CUDA
// stream as an integer (torch.cuda.current_stream().cuda_stream): no torch C++ types, so
// one build of this module works under torch 2.11 to 2.13. The Python side
// (fastbert/ops/_cuda.py and the op files) checks every tensor before calling. CUDA
// errors and bad arguments come back as RuntimeError / ValueError; without a GPU a call
// raises RuntimeError instead of crashing.
#include <pybind11/pybind11.h>

#include "fastbert.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastbert CUDA kernels (csrc/): LayerNorm/GELU family, span score, attention";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(fastbert::DType::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(fastbert::DType::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(fastbert::DType::kBFloat16);
  m.attr("LAYERNORM_MAX_COLS") = fastbert::kLayerNormMaxCols;
  m.attr("SPAN_MAX_TOPK") = fastbert::kSpanMaxTopk;
  m.attr("CUDART_VERSION") = CUDART_VERSION;  // the toolkit this module was built with

  m.def(
      "device_count",
      []() {
        int count = 0;
        FASTBERT_CUDA_CHECK(cudaGetDeviceCount(&count));
        return count;
      },
      "Number of CUDA devices the runtime sees; raises RuntimeError when there is no usable GPU or driver.");

  bind_layernorm(m);
  bind_gelu(m);
  bind_span(m);
#ifndef FASTBERT_NO_ATTENTION  // set by csrc/build_ext.py while csrc/attention_bind.cpp does not exist
  bind_attention(m);
#endif
}

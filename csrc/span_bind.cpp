// Python binding of the span_score launcher: bind_span(m), called by bindings.cpp.
// Conventions as in layernorm_bind.cpp (pointers, strides in elements, stream and dtype
// codes as integers; the GIL is released while the launcher runs).
#include <pybind11/pybind11.h>

#include "fastbert.h"

namespace py = pybind11;
using namespace pybind11::literals;
using std::uintptr_t;

void bind_span(pybind11::module_& m) {
  m.def(
      "span_score_fwd",
      [](uintptr_t start_logits, uintptr_t end_logits, uintptr_t mask, uintptr_t start_index, uintptr_t end_index,
         uintptr_t score, int64_t batch, int64_t L, int64_t D, int64_t topk, int64_t stride_sb, int64_t stride_sl,
         int64_t stride_eb, int64_t stride_el, int64_t stride_mb, int64_t stride_ml, int dtype, uintptr_t stream) {
        fastbert::SpanScoreParams p{};
        p.start_logits = fastbert::as_ptr<const void>(start_logits);
        p.end_logits = fastbert::as_ptr<const void>(end_logits);
        p.mask = fastbert::as_ptr<const uint8_t>(mask);
        p.start_index = fastbert::as_ptr<int64_t>(start_index);
        p.end_index = fastbert::as_ptr<int64_t>(end_index);
        p.score = fastbert::as_ptr<float>(score);
        p.batch = batch;
        p.L = L;
        p.D = D;
        p.topk = topk;
        p.stride_sb = stride_sb;
        p.stride_sl = stride_sl;
        p.stride_eb = stride_eb;
        p.stride_el = stride_el;
        p.stride_mb = stride_mb;
        p.stride_ml = stride_ml;
        p.dtype = fastbert::as_dtype(dtype, "dtype");
        p.stream = fastbert::as_stream(stream);
        fastbert::span_score_fwd(p);
      },
      "The topk best spans (i <= j < i + D, both ends allowed by mask) of each of `batch` rows of L logits:\n"
      "writes start_index, end_index (batch, topk) int64 and score (batch, topk) fp32, best first, ties to\n"
      "the smaller (i, j); empty slots -1 / -inf. mask: bool (batch, L) or 0 (everything allowed).",
      "start_logits"_a, "end_logits"_a, "mask"_a, "start_index"_a, "end_index"_a, "score"_a, "batch"_a, "L"_a, "D"_a,
      "topk"_a, "stride_sb"_a, "stride_sl"_a, "stride_eb"_a, "stride_el"_a, "stride_mb"_a, "stride_ml"_a, "dtype"_a,
      "stream"_a, py::call_guard<py::gil_scoped_release>());
}

// span.cu: the span_score launcher (kernel in span.cuh).
#include "span.cuh"

namespace fastbert {

void span_score_fwd(const SpanScoreParams& p) {
  FASTBERT_CHECK_ARG(p.batch >= 0, "span_score: batch must be >= 0");
  FASTBERT_CHECK_ARG(p.L >= 1, "span_score: L must be >= 1, got " + std::to_string(p.L));
  FASTBERT_CHECK_ARG(p.D >= 1 && p.D <= p.L, "span_score: D = min(max_answer_len, L) must be in 1..L");
  FASTBERT_CHECK_ARG(p.topk >= 1 && p.topk <= kSpanMaxTopk,
                     "span_score: topk must be in 1..32, got " + std::to_string(p.topk));
  FASTBERT_CHECK_ARG(p.L * p.D <= INT32_MAX, "span_score: L * min(max_answer_len, L) must be < 2^31 (the key "
                                             "holds the flat span index in 31 bits)");
  if (p.batch == 0) return;
  FASTBERT_CHECK_ARG(p.start_logits && p.end_logits && p.start_index && p.end_index && p.score,
                     "span_score: logits and outputs must not be null");
  FASTBERT_CHECK_ARG(p.batch <= INT32_MAX, "span_score: batch must be < 2^31");
  // One warp per row keeps many rows in flight; when rows are fewer than about two per SM,
  // 4 warps split each row's candidates (and merge their lists) to cut the latency.
  int device = 0, sms = 0;
  FASTBERT_CUDA_CHECK(cudaGetDevice(&device));
  FASTBERT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int warps = p.batch >= 2 * static_cast<int64_t>(sms) ? 1 : span::kMaxWarps;
  int dw_log2 = 0;
  while ((int64_t{1} << dw_log2) < p.D && dw_log2 < 5) ++dw_log2;
  dispatch_dtype(p.dtype, "span_score", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto kernel = span::_span_score_fwd_kernel<T>;
    FASTBERT_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch)), dim3(warps * 32), p.stream, p, dw_log2);
    FASTBERT_LAUNCH_CHECK("_span_score_fwd_kernel");
  });
}

}  // namespace fastbert

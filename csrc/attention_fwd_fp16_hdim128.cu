// Attention forward, fp16, head_dim 128: one instantiation per file so the
// build compiles them in parallel. Kernels and launch template: attention.cuh.
#include "attention.cuh"

namespace fastbert {

void attention_fwd_fp16_hdim128(const AttentionParams& params) {
    attn::run_attention_fwd<__half, 128>(params);
}

}  // namespace fastbert

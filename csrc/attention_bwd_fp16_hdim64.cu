// Attention backward (dQ kernel, then dK/dV kernel), fp16, head_dim 64: one instantiation per file so the
// build compiles them in parallel. Kernels and launch template: attention.cuh.
#include "attention.cuh"

namespace fastbert {

void attention_bwd_fp16_hdim64(const AttentionParams& params) {
    attn::run_attention_bwd<__half, 64>(params);
}

}  // namespace fastbert

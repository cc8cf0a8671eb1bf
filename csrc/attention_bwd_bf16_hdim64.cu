// Attention backward (dQ kernel, then dK/dV kernel), bf16, head_dim 64: one instantiation per file so the
// build compiles them in parallel. Kernels and launch template: attention.cuh.
#include "attention.cuh"

namespace fastbert {

void attention_bwd_bf16_hdim64(const AttentionParams& params) {
    attn::run_attention_bwd<__nv_bfloat16, 64>(params);
}

}  // namespace fastbert

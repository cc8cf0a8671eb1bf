// Attention forward, bf16, head_dim 32: one instantiation per file so the
// build compiles them in parallel. Kernels and launch template: attention.cuh.
#include "attention.cuh"

namespace fastbert {

void attention_fwd_bf16_hdim32(const AttentionParams& params) {
    attn::run_attention_fwd<__nv_bfloat16, 32>(params);
}

}  // namespace fastbert

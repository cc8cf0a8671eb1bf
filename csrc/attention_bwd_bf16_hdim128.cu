// Attention backward (dQ kernel, then dK/dV kernel), bf16, head_dim 128: one instantiation per file so the
// build compiles them in parallel. Kernels and launch template: attention.cuh.
#include "attention.cuh"

namespace fastbert {

void attention_bwd_bf16_hdim128(const AttentionParams& params) {
    attn::run_attention_bwd<__nv_bfloat16, 128>(params);
}

}  // namespace fastbert

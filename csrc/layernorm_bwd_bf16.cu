// Explicit instantiations: the add_layernorm / layernorm_gelu bwd kernels for __nv_bfloat16
// (one file per pass and dtype, so the build compiles them in parallel).
#include "layernorm.cuh"

namespace fastbert {
namespace layernorm {
FASTBERT_LAYERNORM_INSTANTIATE_BWD(__nv_bfloat16)
template void bwd_launch<__nv_bfloat16, float, false>(const LayerNormBwdParams&);  // fp32 residual (autocast)
}  // namespace layernorm
}  // namespace fastbert

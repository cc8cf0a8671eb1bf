// Explicit instantiations: the add_layernorm / layernorm_gelu bwd kernels for __half
// (one file per pass and dtype, so the build compiles them in parallel).
#include "layernorm.cuh"

namespace fastbert {
namespace layernorm {
FASTBERT_LAYERNORM_INSTANTIATE_BWD(__half)
template void bwd_launch<__half, float, false>(const LayerNormBwdParams&);  // fp32 residual (autocast)
}  // namespace layernorm
}  // namespace fastbert

// Explicit instantiations: the add_layernorm / layernorm_gelu fwd kernels for __half
// (one file per pass and dtype, so the build compiles them in parallel).
#include "layernorm.cuh"

namespace fastbert {
namespace layernorm {
FASTBERT_LAYERNORM_INSTANTIATE_FWD(__half)
template void fwd_launch<__half, float, false>(const LayerNormFwdParams&);  // fp32 residual (autocast)
}  // namespace layernorm
}  // namespace fastbert

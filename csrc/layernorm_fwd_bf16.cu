// Explicit instantiations: the add_layernorm / layernorm_gelu fwd kernels for __nv_bfloat16
// (one file per pass and dtype, so the build compiles them in parallel).
#include "layernorm.cuh"

namespace fastbert {
namespace layernorm {
FASTBERT_LAYERNORM_INSTANTIATE_FWD(__nv_bfloat16)
template void fwd_launch<__nv_bfloat16, float, false>(const LayerNormFwdParams&);  // fp32 residual (autocast)
}  // namespace layernorm
}  // namespace fastbert

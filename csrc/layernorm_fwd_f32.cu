// Explicit instantiations: the add_layernorm / layernorm_gelu fwd kernels for float
// (one file per pass and dtype, so the build compiles them in parallel).
#include "layernorm.cuh"

namespace fastbert {
namespace layernorm {
FASTBERT_LAYERNORM_INSTANTIATE_FWD(float)
}  // namespace layernorm
}  // namespace fastbert

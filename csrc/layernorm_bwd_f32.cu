// Explicit instantiations: the add_layernorm / layernorm_gelu bwd kernels for float
// (one file per pass and dtype, so the build compiles them in parallel).
#include "layernorm.cuh"

namespace fastbert {
namespace layernorm {
FASTBERT_LAYERNORM_INSTANTIATE_BWD(float)
}  // namespace layernorm
}  // namespace fastbert

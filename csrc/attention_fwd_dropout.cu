// The dropout keep-mask of the attention kernels, for tests: on the device
// (attention_dropout_mask) and on the host (attention_dropout_mask_host, which
// lets a CPU test check the Philox stream against the Triton backend's).
#include "attention.cuh"

namespace fastbert {
namespace attn {

// One thread per element of keep (batch, heads, seqlen, seqlen), grid-stride.
__global__ void attention_dropout_mask_kernel(uint8_t* keep, int batch, int heads, int seqlen, uint64_t seed,
                                              uint32_t threshold) {
    const int64_t total = static_cast<int64_t>(batch) * heads * seqlen * seqlen;
    for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int j = static_cast<int>(idx % seqlen);
        const int i = static_cast<int>((idx / seqlen) % seqlen);
        const int h = static_cast<int>((idx / seqlen / seqlen) % heads);
        const int b = static_cast<int>(idx / seqlen / seqlen / heads);
        keep[idx] = dropout_keep(seed, b, h, i, j, threshold) ? 1 : 0;
    }
}

}  // namespace attn

void attention_dropout_mask(uint8_t* keep, int batch, int heads, int seqlen, uint64_t seed,
                            uint32_t dropout_threshold, cudaStream_t stream) {
    const int64_t total = static_cast<int64_t>(batch) * heads * seqlen * seqlen;
    if (total <= 0) return;
    int device = 0;
    FASTBERT_CUDA_CHECK(cudaGetDevice(&device));
    const int64_t blocks = (total + 255) / 256;
    const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
    attn::attention_dropout_mask_kernel<<<grid, 256, 0, stream>>>(
        keep, batch, heads, seqlen, seed, dropout_threshold);
    FASTBERT_LAUNCH_CHECK("attention_dropout_mask_kernel");
}

void attention_dropout_mask_host(uint8_t* keep, int batch, int heads, int seqlen, uint64_t seed,
                                 uint32_t dropout_threshold) {
    int64_t idx = 0;
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < seqlen; ++i)
                for (int j = 0; j < seqlen; ++j) keep[idx++] = attn::dropout_keep(seed, b, h, i, j, dropout_threshold);
}

}  // namespace fastbert

// fastbert._C's attention functions with the kernels run by the CPU emulation
// (emu_runtime.h), as the Python module _attention_emu: same binding code
// (csrc/attention_bind.cpp), same Python launchers, host pointers instead of
// device pointers. Built by tests/test_cuda_attention.py with g++:
//   g++ -std=c++17 -O1 -shared -fPIC -I csrc -I <cuda include> -I <python> -I <pybind11>
//       -DFASTBERT_ATTN_EMULATE='"emu_attention_primitives.h"' attention_emu.cpp csrc/attention_bind.cpp
#include <pybind11/pybind11.h>

#include "emu_runtime.h"

// CUDA keywords and built-ins the kernels use, for the host compiler.
#define __launch_bounds__(...)
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())

#include "attention.cuh"

namespace fastbert {
namespace {

using namespace attn;

template <typename T, int D>
void emu_fwd(const AttentionParams& p) {
    if (attention_empty(p)) return;
    const dim3 grid = attention_grid(p, FwdTile<D>::kBlockM);
    const size_t smem = fwd_smem_bytes<T, D>();
    if (p.dropout) {
        emu::run_grid(grid, kThreads, smem, [&] { attention_fwd_kernel<T, D, true>(p); }, "attention_fwd_kernel");
    } else {
        emu::run_grid(grid, kThreads, smem, [&] { attention_fwd_kernel<T, D, false>(p); }, "attention_fwd_kernel");
    }
}

template <typename T, int D>
void emu_bwd(const AttentionParams& p) {
    if (attention_empty(p)) return;
    const dim3 grid_dq = attention_grid(p, DqTile<D>::kBlockM);
    const dim3 grid_dkdv = attention_grid(p, DkvTile<D>::kBlockN);
    if (p.dropout) {
        emu::run_grid(grid_dq, kThreads, dq_smem_bytes<T, D>(), [&] { attention_bwd_dq_kernel<T, D, true>(p); },
                      "attention_bwd_dq_kernel");
        emu::run_grid(grid_dkdv, kThreads, dkdv_smem_bytes<T, D>(),
                      [&] { attention_bwd_dkdv_kernel<T, D, true>(p); }, "attention_bwd_dkdv_kernel");
    } else {
        emu::run_grid(grid_dq, kThreads, dq_smem_bytes<T, D>(), [&] { attention_bwd_dq_kernel<T, D, false>(p); },
                      "attention_bwd_dq_kernel");
        emu::run_grid(grid_dkdv, kThreads, dkdv_smem_bytes<T, D>(),
                      [&] { attention_bwd_dkdv_kernel<T, D, false>(p); }, "attention_bwd_dkdv_kernel");
    }
}

}  // namespace

#define FASTBERT_EMU_LAUNCHERS(NAME, T, D)                                              \
    void attention_fwd_##NAME(const AttentionParams& p) { emu_fwd<T, D>(p); }          \
    void attention_bwd_##NAME(const AttentionParams& p) { emu_bwd<T, D>(p); }
FASTBERT_EMU_LAUNCHERS(fp16_hdim32, __half, 32)
FASTBERT_EMU_LAUNCHERS(fp16_hdim64, __half, 64)
FASTBERT_EMU_LAUNCHERS(fp16_hdim128, __half, 128)
FASTBERT_EMU_LAUNCHERS(bf16_hdim32, __nv_bfloat16, 32)
FASTBERT_EMU_LAUNCHERS(bf16_hdim64, __nv_bfloat16, 64)
FASTBERT_EMU_LAUNCHERS(bf16_hdim128, __nv_bfloat16, 128)

void attention_dropout_mask_host(uint8_t* keep, int batch, int heads, int seqlen, uint64_t seed,
                                 uint32_t dropout_threshold) {
    int64_t idx = 0;
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < seqlen; ++i)
                for (int j = 0; j < seqlen; ++j) keep[idx++] = attn::dropout_keep(seed, b, h, i, j, dropout_threshold);
}

// "Device" memory is host memory here.
void attention_dropout_mask(uint8_t* keep, int batch, int heads, int seqlen, uint64_t seed,
                            uint32_t dropout_threshold, cudaStream_t) {
    attention_dropout_mask_host(keep, batch, heads, seqlen, seed, dropout_threshold);
}

}  // namespace fastbert

PYBIND11_MODULE(_attention_emu, m) {
    m.doc() = "fastbert attention kernels run by a CPU emulation of the GPU (tests only)";
    bind_attention(m);
    m.attr("HOST_EMULATION") = true;
}

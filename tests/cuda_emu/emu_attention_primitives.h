// Included by csrc/attention.cuh inside namespace fastbert::attn when
// FASTBERT_ATTN_EMULATE names this file: the kernels' warp-level primitives,
// routed to the CPU emulation in emu_runtime.h (no system headers here).

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row_ptr) {
    ::emu::ldmatrix_x4(r, row_ptr, false);
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
    ::emu::ldmatrix_x4(r, row_ptr, true);
}
__device__ __forceinline__ void cp_async_16(void* smem_ptr, const void* gmem_ptr, bool valid) {
    ::emu::cp_async_16(smem_ptr, gmem_ptr, valid);
}
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { ::emu::cp_async_wait(N); }
__device__ __forceinline__ void block_sync() { ::emu::block_barrier(); }
__device__ __forceinline__ uint4* dynamic_smem() {
    return reinterpret_cast<uint4*>(::emu::current_block()->smem.data());
}
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return ::emu::shfl_xor(v, lane_mask); }

template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                                                 uint32_t b0, uint32_t b1) {
    ::emu::mma_16816(d, a, b0, b1, sizeof(T) == 2 && std::is_same<T, __nv_bfloat16>::value);
}

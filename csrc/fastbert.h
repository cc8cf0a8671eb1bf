// fastbert.h: what every csrc/ file shares.
//
//   1. Launch structs: plain data (device pointers, int64 sizes and row strides in
//      elements, flags, the stream). No torch types, so fastbert._C does not depend on
//      torch's C++ ABI: one build serves torch 2.11 to 2.13.
//   2. Launcher declarations (defined in csrc/<op>*.cu). Each checks its arguments
//      (std::invalid_argument -> Python ValueError), checks every CUDA call and launch
//      (std::runtime_error -> Python RuntimeError, with the CUDA error text) and never
//      dereferences a device pointer on the host.
//   3. The bind_<op> functions (csrc/<op>_bind.cpp), declared at global scope, that
//      bindings.cpp calls from PYBIND11_MODULE (only where pybind11 is included first).
//   4. Under nvcc only: device helpers (dtype conversion, 16-byte vectors, warp sums)
//      and dispatch from the runtime DType to a template argument.
//
// Host files (.cpp) are compiled by nvcc too, so <cuda_runtime_api.h> is always found.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace fastbert {

// Element types of activations and parameters; the integers are the Python side's codes
// (fastbert/ops/_cuda.py DTYPES).
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline int dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// ----------------------------------------------------------------------------- errors

[[noreturn]] inline void raise_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  std::string msg = std::string("fastbert._C: ") + what + " failed with " + cudaGetErrorName(err) + ": " +
                    cudaGetErrorString(err);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    msg += " (no usable CUDA GPU and driver on this machine: the 'cuda' backend needs one)";
  }
  msg += " [" + std::string(file) + ":" + std::to_string(line) + "]";
  throw std::runtime_error(msg);
}

// Every CUDA runtime call goes through this.
#define FASTBERT_CUDA_CHECK(expr)                                                \
  do {                                                                           \
    const cudaError_t fastbert_err_ = (expr);                                    \
    if (fastbert_err_ != cudaSuccess) {                                          \
      ::fastbert::raise_cuda_error(fastbert_err_, #expr, __FILE__, __LINE__);    \
    }                                                                            \
  } while (0)

// After every kernel launch (launch-configuration errors; faults inside the kernel
// surface at the next synchronising call, as in PyTorch).
#define FASTBERT_LAUNCH_CHECK(kernel_name)                                       \
  do {                                                                           \
    const cudaError_t fastbert_err_ = cudaGetLastError();                        \
    if (fastbert_err_ != cudaSuccess) {                                          \
      ::fastbert::raise_cuda_error(fastbert_err_, "launch of " kernel_name,      \
                                   __FILE__, __LINE__);                          \
    }                                                                            \
  } while (0)

// Argument checks in launchers (the Python side checks first; these guard raw calls).
#define FASTBERT_CHECK_ARG(cond, msg)                                            \
  do {                                                                           \
    if (!(cond)) throw std::invalid_argument(std::string("fastbert._C: ") + (msg)); \
  } while (0)

// ----------------------------------------------------------------------------- launch structs

// add_layernorm (h = dropout(x) + residual) and layernorm_gelu (h = x, GELU after the
// affine step) forward: y = LayerNorm(h) [* GELU], per row of `cols` features.
struct LayerNormFwdParams {
  const void* x;          // (rows, cols) dtype
  const void* residual;   // (rows, cols) residual_dtype; add_layernorm only
  const void* weight;     // (cols,) param_dtype
  const void* bias;       // (cols,) param_dtype
  const int64_t* seed;    // (1,) int64 Philox seed on the device; read only when dropout_p > 0
  void* y;                // out (rows, cols) residual_dtype
  float* mean;            // out (rows,) fp32
  float* rstd;            // out (rows,) fp32: 1 / sqrt(var + eps)
  int64_t rows;
  int64_t cols;           // 1..4096
  int64_t stride_x;       // row strides in elements (the last dimension is contiguous)
  int64_t stride_r;
  int64_t stride_y;
  float eps;
  float dropout_p;        // add_layernorm only; 0 = no dropout
  float dropout_scale;    // 1 / (1 - dropout_p), computed in double on the host (as Triton's launcher)
  DType dtype;            // x
  DType param_dtype;      // weight, bias: dtype or float32
  DType residual_dtype;   // residual and y: dtype, or (add_layernorm under autocast) float32 with half x
  void* y_copy;           // optional out (rows, cols) dtype: y once more in x's dtype (add_layernorm), or null
  int64_t stride_y_copy;
  cudaStream_t stream;
};

// Their backward. dw/db are summed per block into `partial` (2, max_partials, cols) fp32,
// then reduced over blocks by a second kernel into dweight/dbias: no atomics.
struct LayerNormBwdParams {
  const void* dy;         // (rows, cols) residual_dtype
  const void* x;          // (rows, cols) dtype: the forward's input
  const void* residual;   // (rows, cols) residual_dtype; add_layernorm only
  const void* weight;     // (cols,) param_dtype
  const void* bias;       // (cols,) param_dtype; layernorm_gelu only (z = xhat * w + b)
  const float* mean;      // (rows,) fp32 saved by the forward
  const float* rstd;      // (rows,) fp32
  const int64_t* seed;    // (1,) int64; read only when dropout_p > 0
  void* dh;               // out (rows, cols) residual_dtype: add_layernorm dresidual / layernorm_gelu dx
  void* dx;               // out (rows, cols) dtype: add_layernorm dx, written only when dropout_p > 0
                          // or residual_dtype != dtype (otherwise dx == dh)
  float* partial;         // scratch (2, max_partials, cols) fp32
  void* dweight;          // out (cols,) param_dtype
  void* dbias;            // out (cols,) param_dtype
  int64_t rows;
  int64_t cols;
  int64_t stride_dy;
  int64_t stride_x;
  int64_t stride_r;
  int64_t stride_dh;
  int64_t stride_dx;
  int64_t max_partials;   // rows of `partial` per set (>= 1); blocks of the main kernel <= this
  float dropout_p;
  float dropout_scale;    // 1 / (1 - dropout_p), computed in double on the host
  DType dtype;            // x, dx
  DType param_dtype;
  DType residual_dtype;   // dy, residual, dh: dtype, or float32 with half x (add_layernorm)
  const void* dy_copy;    // optional (rows, cols) dtype: the gradient of the forward's y_copy, added to dy
  int64_t stride_dy_copy;
  cudaStream_t stream;
};

// The add_layernorm kept-mask for a seed (tests): keep[r, c] = 1 where x[r, c] was kept.
struct DropoutMaskParams {
  const int64_t* seed;    // (1,) int64
  int8_t* keep;           // out (rows, cols) int8, contiguous
  int64_t rows;
  int64_t cols;
  float dropout_p;
  cudaStream_t stream;
};

// bias_gelu: y = GELU(x + bias) and its backward (dbias through `partial`, as above).
struct BiasGeluParams {
  const void* x;          // (rows, cols) dtype
  const void* bias;       // (cols,) bias_dtype
  const void* dy;         // backward: (rows, cols) dtype
  void* y;                // forward out: (rows, cols) dtype
  void* dx;               // backward out: (rows, cols) dtype
  float* partial;         // backward scratch (max_partials, cols) fp32
  void* dbias;            // backward out: (cols,) bias_dtype
  int64_t rows;
  int64_t cols;
  int64_t stride_x;
  int64_t stride_dy;
  int64_t stride_out;     // y (forward) or dx (backward)
  int64_t max_partials;
  bool approximate_tanh;  // false: erf GELU; true: tanh GELU
  DType dtype;
  DType bias_dtype;
  cudaStream_t stream;
};

// span_score: the topk best spans (i <= j < i + D, both ends allowed) of each row.
struct SpanScoreParams {
  const void* start_logits;  // (batch, L) dtype, any strides
  const void* end_logits;    // (batch, L) dtype
  const uint8_t* mask;       // (batch, L) bool or nullptr (everything allowed)
  int64_t* start_index;      // out (batch, topk) int64, contiguous
  int64_t* end_index;        // out (batch, topk) int64, contiguous
  float* score;              // out (batch, topk) fp32, contiguous
  int64_t batch;
  int64_t L;
  int64_t D;                 // min(max_answer_len, L); L * D < 2^31
  int64_t topk;              // 1..32
  int64_t stride_sb, stride_sl, stride_eb, stride_el, stride_mb, stride_ml;  // elements
  DType dtype;
  cudaStream_t stream;
};

// ----------------------------------------------------------------------------- launchers

constexpr int64_t kLayerNormMaxCols = 4096;
constexpr int64_t kSpanMaxTopk = 32;

void add_layernorm_fwd(const LayerNormFwdParams& p);      // csrc/layernorm.cu
void add_layernorm_bwd(const LayerNormBwdParams& p);
void layernorm_gelu_fwd(const LayerNormFwdParams& p);
void layernorm_gelu_bwd(const LayerNormBwdParams& p);
void add_layernorm_keep_mask(const DropoutMaskParams& p);
void bias_gelu_fwd(const BiasGeluParams& p);              // csrc/gelu.cu
void bias_gelu_bwd(const BiasGeluParams& p);
void span_score_fwd(const SpanScoreParams& p);            // csrc/span.cu

// out[s][c] = sum_g partial[s][g][c] over g < groups, for s < sets (1 or 2), cast to
// out_dtype: the second stage of every row reduction (csrc/gelu.cu).
void column_sums(const float* partial, int64_t partial_rows, int64_t groups, int64_t cols, int sets,
                 void* out0, void* out1, DType out_dtype, cudaStream_t stream);

}  // namespace fastbert

// ----------------------------------------------------------------------------- bindings
// One per op family, each in csrc/<op>_bind.cpp; csrc/bindings.cpp calls them all.
#ifdef PYBIND11_VERSION_MAJOR
void bind_layernorm(pybind11::module_& m);  // csrc/layernorm_bind.cpp
void bind_gelu(pybind11::module_& m);       // csrc/gelu_bind.cpp
void bind_span(pybind11::module_& m);       // csrc/span_bind.cpp
void bind_attention(pybind11::module_& m);  // csrc/attention_bind.cpp

namespace fastbert {
// Pointers and streams cross from Python as integers (tensor.data_ptr(), stream.cuda_stream).
template <typename T>
inline T* as_ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }
inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }
inline DType as_dtype(int code, const char* name) {
  FASTBERT_CHECK_ARG(code >= 0 && code <= 2, std::string(name) + " must be a dtype code 0 (float32), 1 (float16) or "
                                               "2 (bfloat16), got " + std::to_string(code));
  return static_cast<DType>(code);
}
}  // namespace fastbert
#endif

// ----------------------------------------------------------------------------- device helpers
// Also compiled by g++ for the CPU emulation of the kernels (FASTBERT_EMULATE, tests only:
// tests/test_cuda_build.py), where the emulation header provides the CUDA built-ins.
#if defined(__CUDACC__) || defined(FASTBERT_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Launch `kernel` (a pointer to a __global__ function) on `stream`; the caller checks it
// with FASTBERT_LAUNCH_CHECK. The emulation runs every thread of the grid on the CPU.
#ifdef FASTBERT_EMULATE
#define FASTBERT_LAUNCH(kernel, grid, block, stream, ...) ::fbemu::launch(grid, block, [&] { kernel(__VA_ARGS__); })
#else
#define FASTBERT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace fastbert {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of T: one LDG.128 / STG.128.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// out[0..N) = float(ptr[0..N)), N a multiple of 16 / sizeof(T); ptr 16-byte aligned.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[N]) {
  constexpr int P = Vec16<T>::kSize;
  static_assert(N % P == 0, "load_vec: N must be a multiple of 16 bytes of T");
#pragma unroll
  for (int c = 0; c < N; c += P) {
    const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(ptr + c);
#pragma unroll
    for (int i = 0; i < P; ++i) out[c + i] = to_float(v.v[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[N]) {
  constexpr int P = Vec16<T>::kSize;
  static_assert(N % P == 0, "store_vec: N must be a multiple of 16 bytes of T");
#pragma unroll
  for (int c = 0; c < N; c += P) {
    Vec16<T> v;
#pragma unroll
    for (int i = 0; i < P; ++i) v.v[i] = from_float<T>(in[c + i]);
    *reinterpret_cast<Vec16<T>*>(ptr + c) = v;
  }
}

// N consecutive elements from `col` of a row of `cols`; VECTOR: 16-byte loads (the caller
// guarantees alignment and col + N <= cols), else scalar loads, 0 past the row's end.
template <bool VECTOR, typename T, int N>
__device__ __forceinline__ void load_chunk(const T* row, int64_t col, int64_t cols, float (&out)[N]) {
  if constexpr (VECTOR) {
    load_vec<T, N>(row + col, out);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = col + i < cols ? to_float(row[col + i]) : 0.0f;
  }
}

template <bool VECTOR, typename T, int N>
__device__ __forceinline__ void store_chunk(T* row, int64_t col, int64_t cols, const float (&in)[N]) {
  if constexpr (VECTOR) {
    store_vec<T, N>(row + col, in);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (col + i < cols) row[col + i] = from_float<T>(in[i]);
    }
  }
}

// A parameter vector (weight, bias) stored as T or as float32 (mixed precision): the
// choice is a runtime flag, uniform across the grid, so the branch costs nothing.
template <bool VECTOR, typename T, int N>
__device__ __forceinline__ void load_param_chunk(const void* ptr, bool fp32, int64_t col, int64_t cols,
                                                 float (&out)[N]) {
  if (fp32) {
    load_chunk<VECTOR, float, N>(static_cast<const float*>(ptr), col, cols, out);
  } else {
    load_chunk<VECTOR, T, N>(static_cast<const T*>(ptr), col, cols, out);
  }
}

// Sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Runtime DType -> template argument: f(TypeTag<T>{}) with T float, __half or __nv_bfloat16.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
inline void dispatch_dtype(DType d, const char* what, F&& f) {
  switch (d) {
    case DType::kFloat32: f(TypeTag<float>{}); return;
    case DType::kFloat16: f(TypeTag<__half>{}); return;
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
  }
  throw std::invalid_argument(std::string("fastbert._C: ") + what + ": unsupported dtype code " +
                              std::to_string(static_cast<int>(d)));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// How many blocks of `kernel` (with `threads` threads) the current GPU holds at once: the
// grid of a kernel that loops over rows and writes one partial sum per block (one wave,
// no tail). Read once per kernel (every GPU of a process is assumed the same kind).
template <typename Kernel>
inline int64_t resident_blocks(Kernel kernel, int threads) {
  int device = 0, sms = 0, per_sm = 0;
  FASTBERT_CUDA_CHECK(cudaGetDevice(&device));
  FASTBERT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FASTBERT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * sms;
}

// ----------------------------------------------------------------------------- dropout RNG
// Philox4x32-10 exactly as Triton's tl.randint4x(seed, offset) computes it (counter
// (offset lo, offset hi, 0, 0), key (seed lo, seed hi)), and tl.uint_to_uniform_float:
// the CUDA backend draws the same uniforms as the Triton backend for the same seed and
// offsets, so a mask can be checked against the other backend's.
__device__ __forceinline__ uint4 philox4x32_10(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t old0 = c0, old2 = c2;
    c0 = __umulhi(0xCD9E8D57u, old2) ^ c1 ^ k0;
    c2 = __umulhi(0xD2511F53u, old0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old2;
    c3 = 0xD2511F53u * old0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// A uniform float in [0, 1) from 32 random bits (~i == -i - 1 without overflow).
__device__ __forceinline__ float uint_to_uniform(uint32_t bits) {
  const int32_t i = static_cast<int32_t>(bits);
  return __int2float_rn(i < 0 ? ~i : i) * 4.6566127342e-10f;
}

}  // namespace fastbert
#endif  // __CUDACC__ || FASTBERT_EMULATE

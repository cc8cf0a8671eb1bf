// gelu.cuh: GELU math (shared with layernorm_gelu), the bias_gelu kernels and the
// column-sum kernel that finishes every row reduction (dbias here, dweight/dbias in
// layernorm). The math is kernels/gelu.py's; all of it in fp32, one cast on store.
//
//   erf form (BERT):  gelu(u)  = u * Phi(u),          Phi(u) = 0.5 * (1 + erf(u / sqrt(2)))
//                     gelu'(u) = Phi(u) + u * phi(u),  phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
//   tanh form:        t = tanh(k (u + c u^3)),  k = sqrt(2 / pi), c = 0.044715
//                     gelu(u)  = 0.5 u (1 + t)
//                     gelu'(u) = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 c u^2)
//
// bias_gelu: y = gelu(x + bias); backward dx = dy * gelu'(x + bias) (u is recomputed from
// the saved x, never stored), dbias = sum over rows of dx.
//
// Layout: x is (rows, cols) with a contiguous last dimension. A thread owns one chunk of
// VEC columns (16 bytes when the row is 16-byte aligned; one column otherwise) and walks
// rows with a stride of gridDim.y * blockDim.y, U rows per step so that U independent
// loads are in flight before the first use. The backward sums its dx per column in fp32
// registers, then over the block's threadIdx.y in shared memory, and writes one row of
// `partial` per blockIdx.y; _column_sums_kernel adds those rows up (no atomics: no
// contention, and the same result on every run).
#pragma once

#include "fastbert.h"

namespace fastbert {

// ----------------------------------------------------------------------------- GELU math

__device__ __forceinline__ float gelu_erf(float u) {
  return 0.5f * u * (1.0f + erff(u * 0.70710678118654752f));
}

__device__ __forceinline__ float gelu_erf_grad(float u) {
  const float cdf = 0.5f * (1.0f + erff(u * 0.70710678118654752f));
  const float pdf = expf(-0.5f * u * u) * 0.39894228040143268f;
  return cdf + u * pdf;
}

__device__ __forceinline__ float gelu_tanh(float u) {
  const float t = tanhf(0.79788456080286536f * (u + 0.044715f * u * u * u));
  return 0.5f * u * (1.0f + t);
}

__device__ __forceinline__ float gelu_tanh_grad(float u) {
  const float t = tanhf(0.79788456080286536f * (u + 0.044715f * u * u * u));
  return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 0.134145f * u * u);
}

template <bool TANH>
__device__ __forceinline__ float gelu(float u) {
  if constexpr (TANH) return gelu_tanh(u);
  else return gelu_erf(u);
}

template <bool TANH>
__device__ __forceinline__ float gelu_grad(float u) {
  if constexpr (TANH) return gelu_tanh_grad(u);
  else return gelu_erf_grad(u);
}

namespace bias_gelu {

constexpr int kThreads = 256;  // per block: blockDim.x * blockDim.y
constexpr int kRowsPerStep = 4;  // U: rows in flight per thread

// ----------------------------------------------------------------------------- forward

template <typename T, int VEC, bool VECTOR, bool TANH>
__global__ void __launch_bounds__(kThreads) _bias_gelu_fwd_kernel(const BiasGeluParams p) {
  // Thread (x, y) of block (bx, by) owns columns [col, col + VEC) of rows
  // by * blockDim.y + y + k * gridDim.y * blockDim.y, k = 0, 1, ...
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= p.cols) return;
  float b[VEC];
  load_param_chunk<VECTOR, T, VEC>(p.bias, p.bias_dtype == DType::kFloat32, col, p.cols, b);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r0 < p.rows;
       r0 += step * kRowsPerStep) {
    float v[kRowsPerStep][VEC];
#pragma unroll
    for (int u = 0; u < kRowsPerStep; ++u) {
      const int64_t r = r0 + u * step;
      if (r < p.rows) load_chunk<VECTOR, T, VEC>(x + r * p.stride_x, col, p.cols, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kRowsPerStep; ++u) {
      const int64_t r = r0 + u * step;
      if (r < p.rows) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[u][i] = gelu<TANH>(v[u][i] + b[i]);
        store_chunk<VECTOR, T, VEC>(y + r * p.stride_out, col, p.cols, v[u]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- backward

template <typename T, int VEC, bool VECTOR, bool TANH>
__global__ void __launch_bounds__(kThreads) _bias_gelu_bwd_kernel(const BiasGeluParams p) {
  // Same ownership as the forward; block (bx, by) also owns row `by` of `partial` for its
  // columns. Every thread reaches the __syncthreads below (no early return).
  __shared__ float sums[VEC][kThreads];  // [i][y * blockDim.x + x]: conflict-free across a warp
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  float db[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) db[i] = 0.0f;
  if (col < p.cols) {
    float b[VEC];
    load_param_chunk<VECTOR, T, VEC>(p.bias, p.bias_dtype == DType::kFloat32, col, p.cols, b);
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const T* __restrict__ dy = static_cast<const T*>(p.dy);
    T* __restrict__ dx = static_cast<T*>(p.dx);
    const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
    for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r0 < p.rows;
         r0 += step * kRowsPerStep) {
      float xv[kRowsPerStep][VEC], g[kRowsPerStep][VEC];
#pragma unroll
      for (int u = 0; u < kRowsPerStep; ++u) {
        const int64_t r = r0 + u * step;
        if (r < p.rows) {
          load_chunk<VECTOR, T, VEC>(x + r * p.stride_x, col, p.cols, xv[u]);
          load_chunk<VECTOR, T, VEC>(dy + r * p.stride_dy, col, p.cols, g[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kRowsPerStep; ++u) {
        const int64_t r = r0 + u * step;
        if (r < p.rows) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            g[u][i] *= gelu_grad<TANH>(xv[u][i] + b[i]);
            db[i] += g[u][i];
          }
          store_chunk<VECTOR, T, VEC>(dx + r * p.stride_out, col, p.cols, g[u]);
        }
      }
    }
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) sums[i][tid] = db[i];
  __syncthreads();
  if (threadIdx.y == 0 && col < p.cols) {
    float total[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      total[i] = 0.0f;
      for (int yy = 0; yy < static_cast<int>(blockDim.y); ++yy) total[i] += sums[i][yy * blockDim.x + threadIdx.x];
    }
    float* out = p.partial + static_cast<int64_t>(blockIdx.y) * p.cols;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (col + i < p.cols) out[col + i] = total[i];
    }
  }
}

// ----------------------------------------------------------------------------- launch settings

// Threads per block across columns: the widest of 256/128/64/32 whose padding of the
// last column block stays under 1/8 of the chunks (768 fp16 columns = 96 chunks -> 32;
// 3072 -> 384 chunks -> 128); the rest of the 256 threads go down the rows.
inline int threads_x(int64_t chunks) {
  for (int tx = kThreads; tx > 32; tx /= 2) {
    const int64_t padded = (chunks + tx - 1) / tx * tx;
    if ((padded - chunks) * 8 <= chunks) return tx;
  }
  return 32;
}

template <typename T, int VEC, bool VECTOR, bool TANH>
void run(const BiasGeluParams& p, bool backward) {
  const int64_t chunks = (p.cols + VEC - 1) / VEC;
  const int tx = threads_x(chunks);
  const int ty = kThreads / tx;
  const int64_t blocks_x = (chunks + tx - 1) / tx;
  FASTBERT_CHECK_ARG(blocks_x <= INT32_MAX, "bias_gelu: too many columns");
  int64_t blocks_y = (p.rows + int64_t{ty} * kRowsPerStep - 1) / (int64_t{ty} * kRowsPerStep);
  blocks_y = blocks_y < 65535 ? blocks_y : 65535;
  const dim3 block(tx, ty);
  if (!backward) {
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
    const auto kernel = _bias_gelu_fwd_kernel<T, VEC, VECTOR, TANH>;
    FASTBERT_LAUNCH(kernel, grid, block, p.stream, p);
    FASTBERT_LAUNCH_CHECK("_bias_gelu_fwd_kernel");
    return;
  }
  // One wave of resident blocks, each blockIdx.y writing one row of `partial` (at most
  // max_partials rows: the Python launcher sizes it at a few blocks per SM).
  static const int64_t resident = resident_blocks(_bias_gelu_bwd_kernel<T, VEC, VECTOR, TANH>, kThreads);
  int64_t cap = (resident < p.max_partials ? resident : p.max_partials) / blocks_x;
  cap = cap < 1 ? 1 : cap;
  blocks_y = blocks_y < cap ? blocks_y : cap;
  FASTBERT_CHECK_ARG(blocks_y <= p.max_partials, "bias_gelu_bwd: max_partials is smaller than the column blocks");
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  const auto kernel = _bias_gelu_bwd_kernel<T, VEC, VECTOR, TANH>;
  FASTBERT_LAUNCH(kernel, grid, block, p.stream, p);
  FASTBERT_LAUNCH_CHECK("_bias_gelu_bwd_kernel");
  column_sums(p.partial, p.max_partials, blocks_y, p.cols, 1, p.dbias, nullptr, p.bias_dtype, p.stream);
}

// Runtime flags -> template arguments: 16-byte chunks where every row start is 16-byte
// aligned, single columns otherwise; erf or tanh.
template <typename T>
void launch(const BiasGeluParams& p, bool backward) {
  constexpr int V = Vec16<T>::kSize;
  const bool vector = p.cols % V == 0 && aligned16(p.x) && aligned16(p.bias) && p.stride_x % V == 0 &&
                      p.stride_out % V == 0 && aligned16(backward ? p.dx : p.y) &&
                      (!backward || (aligned16(p.dy) && p.stride_dy % V == 0));
  if (vector) {
    if (p.approximate_tanh) run<T, V, true, true>(p, backward);
    else run<T, V, true, false>(p, backward);
  } else {
    if (p.approximate_tanh) run<T, 1, false, true>(p, backward);
    else run<T, 1, false, false>(p, backward);
  }
}

}  // namespace bias_gelu

// ----------------------------------------------------------------------------- column sums

// out_s[c] = sum_{g < groups} partial[s][g][c]: block (32, 8) owns 32 columns of set
// blockIdx.y; threadIdx.y strides over the groups, shared memory adds the 8 slices.
template <typename OutT>
__global__ void __launch_bounds__(256) _column_sums_kernel(const float* __restrict__ partial, int64_t partial_rows,
                                                           int64_t groups, int64_t cols, void* out0, void* out1) {
  __shared__ float slices[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const float* src = partial + static_cast<int64_t>(blockIdx.y) * partial_rows * cols;
  float s = 0.0f;
  if (col < cols) {
    for (int64_t g = threadIdx.y; g < groups; g += 8) s += src[g * cols + col];
  }
  slices[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += slices[k][threadIdx.x];
    OutT* out = static_cast<OutT*>(blockIdx.y == 0 ? out0 : out1);
    out[col] = from_float<OutT>(total);
  }
}

}  // namespace fastbert

// layernorm.cuh: the LayerNorm family, add_layernorm and layernorm_gelu (the math of
// kernels/layernorm.py, whose header derives it).
//
// Forward, per row of N features (w, b: (N,)):
//   add_layernorm:   h = dropout(x) + r,  dropout(x)_i = x_i * keep_i / (1 - p)
//   layernorm_gelu:  h = x
//   mean = sum_i h_i / N,  rstd = 1 / sqrt(sum_i (h_i - mean)^2 / N + eps),  xhat = (h - mean) * rstd
//   (in float32 the mean is corrected by the centred row's own mean; see the forward)
//   add_layernorm:   y = xhat * w + b;   layernorm_gelu: z = xhat * w + b, y = gelu(z) (erf)
// Only mean and rstd (fp32) are saved, plus the dropout seed: keep_i is the Philox uniform
// of group row * ceil(N / 4) + col / 4, component col % 4 (as Triton's _keep), >= p.
//
// Backward, g = dy (add_layernorm) or dy * gelu'(z) (layernorm_gelu), gw = g * w:
//   dh = rstd * (gw - mean_i(gw * xhat) * xhat - mean_i(gw))
//   dw = sum_rows g * xhat,  db = sum_rows g;  add_layernorm: dresidual = dh, dx = dh * keep / (1 - p)
//
// Layout: TPR threads own a row (TPR = 32: one warp, four rows per 128-thread block;
// TPR >= 128: the whole block). Thread t of a row holds chunks t, t + TPR, ..., NV of
// them, of VEC consecutive columns each, in registers: the row is read once, both
// statistics come from registers in two reductions (the sum, then the centred sum, which
// corrects the mean, with the centred sum of squares: the corrected two-pass variance)
// with warp shuffles and, past one warp, a shared-memory step.
// VECTOR: 16-byte chunks (VEC = 16 / sizeof(T)) where every row start is 16-byte aligned
// and N % VEC == 0; otherwise scalar loads in chunks of 4 columns (the fallback).
// The backward runs at most max_partials blocks that loop over rows; each keeps its
// columns' dw/db sums in fp32 registers, combines its row groups in shared memory and
// writes one row of `partial`; column_sums (gelu.cu) finishes the sum (no atomics).
#pragma once

#include "fastbert.h"
#include "gelu.cuh"

namespace fastbert {
namespace layernorm {

template <int TPR>
__host__ __device__ constexpr int block_threads() { return TPR < 128 ? 128 : TPR; }

// Sum of v over the TPR threads of a row; every one of them gets it. TPR > 32 means the
// block owns one row, so the __syncthreads are reached by every thread.
template <int TPR>
__device__ __forceinline__ float2 row_sum2(float a, float b, float2* scratch) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // every thread has read the previous call's scratch
    if (lane == 0) scratch[warp] = make_float2(a, b);
    __syncthreads();
    const float2 t = lane < kWarps ? scratch[lane] : make_float2(0.0f, 0.0f);
    a = warp_sum(t.x);
    b = warp_sum(t.y);
  }
  return make_float2(a, b);
}

template <int TPR>
__device__ __forceinline__ float row_sum(float a, float2* scratch) {
  a = warp_sum(a);
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp].x = a;
    __syncthreads();
    a = warp_sum(lane < kWarps ? scratch[lane].x : 0.0f);
  }
  return a;
}

// keep[i] for the VEC columns from `col` (a multiple of 4) of `row`: VEC / 4 Philox calls.
template <int VEC>
__device__ __forceinline__ void dropout_keep(uint64_t seed, int64_t row, int64_t col, int64_t cols, float p,
                                             bool (&keep)[VEC]) {
  static_assert(VEC % 4 == 0, "dropout chunks cover whole Philox groups of 4 columns");
  const int64_t groups = (cols + 3) / 4;
#pragma unroll
  for (int q = 0; q < VEC / 4; ++q) {
    const uint4 r = philox4x32_10(seed, static_cast<uint64_t>(row * groups + col / 4 + q));
    keep[4 * q + 0] = uint_to_uniform(r.x) >= p;
    keep[4 * q + 1] = uint_to_uniform(r.y) >= p;
    keep[4 * q + 2] = uint_to_uniform(r.z) >= p;
    keep[4 * q + 3] = uint_to_uniform(r.w) >= p;
  }
}

// ----------------------------------------------------------------------------- forward

template <typename T, typename R, int TPR, int NV, int VEC, bool VECTOR, bool GELU>
__device__ __forceinline__ void fwd_row(const LayerNormFwdParams& p) {
  constexpr int kRowsPerBlock = block_threads<TPR>() / TPR;
  __shared__ float2 scratch[TPR > 32 ? TPR / 32 : 1];
  const int t = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (row >= p.rows) return;  // TPR > 32: one row per block, row < rows by the grid
  const int64_t n = p.cols;
  const bool params_fp32 = p.param_dtype == DType::kFloat32;

  float h[NV][VEC];
  const T* x = static_cast<const T*>(p.x) + row * p.stride_x;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
    if (col < n) {
      load_chunk<VECTOR, T, VEC>(x, col, n, h[k]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) h[k][i] = 0.0f;
    }
  }
  if constexpr (!GELU) {
    const R* r = static_cast<const R*>(p.residual) + row * p.stride_r;
    const bool dropout = p.dropout_p > 0.0f;
    const uint64_t seed = dropout ? static_cast<uint64_t>(*p.seed) : 0;
    const float scale = p.dropout_scale;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
      if (col < n) {
        float rv[VEC];
        load_chunk<VECTOR, R, VEC>(r, col, n, rv);
        if (dropout) {
          bool keep[VEC];
          dropout_keep<VEC>(seed, row, col, n, p.dropout_p, keep);
#pragma unroll
          for (int i = 0; i < VEC; ++i) h[k][i] = keep[i] ? h[k][i] * scale : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) h[k][i] += rv[i];
      }
    }
  }

  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += h[k][i];  // 0 past the row's end
  }
  // Centred twice (as _centre_rows in kernels/layernorm.py): sum / N is a rounding or more
  // off the true mean even for a row of one value, and rstd (1e6 at eps 1e-12 on such a
  // row) magnifies what is left. The once-centred values' own mean is that error, got
  // almost exactly; it is summed in the same pass as the squares (the corrected two-pass
  // variance: sum c^2 / N - residue^2), so the row costs two reductions as before, and
  // (h - mean1) - residue leaves a constant row all 0. h stays as loaded (the compiler may
  // keep it in x's narrower type) and is centred where it is used.
  const float mean1 = row_sum<TPR>(sum, scratch) / static_cast<float>(n);
  float rest = 0.0f, sq = 0.0f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float c = col + i < n ? h[k][i] - mean1 : 0.0f;
      rest += c;
      sq += c * c;
    }
  }
  const float2 sums = row_sum2<TPR>(rest, sq, scratch);
  const float residue = sums.x / static_cast<float>(n);
  const float mean = mean1 + residue;
  // Rounding may leave the difference a little below 0; a NaN (inf - inf: squares past float32's
  // range) must stay NaN, as torch's LayerNorm gives, where fmaxf would make it 0 and rstd 1e6.
  const float var_raw = sums.y / static_cast<float>(n) - residue * residue;
  const float var = var_raw < 0.0f ? 0.0f : var_raw;
  const float rstd = 1.0f / sqrtf(var + p.eps);

  R* y = static_cast<R*>(p.y) + row * p.stride_y;
  // add_layernorm under autocast: y once more in x's dtype, for the next Linear.
  T* y_copy = p.y_copy ? static_cast<T*>(p.y_copy) + row * p.stride_y_copy : nullptr;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
    if (col < n) {
      float w[VEC], b[VEC];
      load_param_chunk<VECTOR, T, VEC>(p.weight, params_fp32, col, n, w);
      load_param_chunk<VECTOR, T, VEC>(p.bias, params_fp32, col, n, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float z = ((h[k][i] - mean1) - residue) * rstd * w[i] + b[i];
        h[k][i] = GELU ? gelu_erf(z) : z;
      }
      store_chunk<VECTOR, R, VEC>(y, col, n, h[k]);
      if (y_copy) store_chunk<VECTOR, T, VEC>(y_copy, col, n, h[k]);
    }
  }
  if (t == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

template <typename T, typename R, int TPR, int NV, int VEC, bool VECTOR>
__global__ void __launch_bounds__(block_threads<TPR>()) _add_layernorm_fwd_kernel(const LayerNormFwdParams p) {
  // Threads [g * TPR, (g + 1) * TPR) of block b own row b * (blockDim / TPR) + g, whole.
  fwd_row<T, R, TPR, NV, VEC, VECTOR, false>(p);
}

template <typename T, int TPR, int NV, int VEC, bool VECTOR>
__global__ void __launch_bounds__(block_threads<TPR>()) _layernorm_gelu_fwd_kernel(const LayerNormFwdParams p) {
  // Threads [g * TPR, (g + 1) * TPR) of block b own row b * (blockDim / TPR) + g, whole.
  fwd_row<T, T, TPR, NV, VEC, VECTOR, true>(p);
}

// ----------------------------------------------------------------------------- backward

template <typename T, typename R, int TPR, int NV, int VEC, bool VECTOR, bool GELU>
__device__ __forceinline__ void bwd_rows(const LayerNormBwdParams& p) {
  constexpr int kBlock = block_threads<TPR>();
  constexpr int kRowsPerBlock = kBlock / TPR;
  constexpr int kCapacity = TPR * NV * VEC;  // columns a row group covers
  __shared__ float2 scratch[TPR > 32 ? TPR / 32 : 1];
  __shared__ float combine[2][kRowsPerBlock > 1 ? kCapacity : 1];
  const int t = threadIdx.x % TPR;
  const int group = threadIdx.x / TPR;
  const int64_t n = p.cols;
  const float inv_n = 1.0f / static_cast<float>(n);
  const bool params_fp32 = p.param_dtype == DType::kFloat32;
  const bool dropout = !GELU && p.dropout_p > 0.0f;
  // dx differs from dh: by dropout, or by dtype (T x with an R residual, autocast's mix).
  const bool write_dx = dropout || !std::is_same<T, R>::value;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const float scale = p.dropout_scale;

  float w[NV][VEC], b[NV][VEC], dw[NV][VEC], db[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) w[k][i] = b[k][i] = dw[k][i] = db[k][i] = 0.0f;
    if (col < n) {
      load_param_chunk<VECTOR, T, VEC>(p.weight, params_fp32, col, n, w[k]);
      if constexpr (GELU) load_param_chunk<VECTOR, T, VEC>(p.bias, params_fp32, col, n, b[k]);
    }
  }

  // Rows group, group + kRowsPerBlock * gridDim.x, ...: the same count for every thread of
  // a row, and (TPR > 32) for the whole block.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + group; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* x = static_cast<const T*>(p.x) + row * p.stride_x;
    const R* dy = static_cast<const R*>(p.dy) + row * p.stride_dy;
    const T* dy_copy = p.dy_copy ? static_cast<const T*>(p.dy_copy) + row * p.stride_dy_copy : nullptr;
    const float mean = p.mean[row];
    const float rstd = p.rstd[row];
    float xhat[NV][VEC], g[NV][VEC];
    bool keep[NV][VEC];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xhat[k][i] = g[k][i] = 0.0f;
        keep[k][i] = true;
      }
      if (col < n) {
        load_chunk<VECTOR, T, VEC>(x, col, n, xhat[k]);
        load_chunk<VECTOR, R, VEC>(dy, col, n, g[k]);
        if (dy_copy) {  // the copy's gradient joins y's
          float gc[VEC];
          load_chunk<VECTOR, T, VEC>(dy_copy, col, n, gc);
#pragma unroll
          for (int i = 0; i < VEC; ++i) g[k][i] += gc[i];
        }
        if constexpr (!GELU) {
          float rv[VEC];
          load_chunk<VECTOR, R, VEC>(static_cast<const R*>(p.residual) + row * p.stride_r, col, n, rv);
          if (dropout) dropout_keep<VEC>(seed, row, col, n, p.dropout_p, keep[k]);
#pragma unroll
          for (int i = 0; i < VEC; ++i) xhat[k][i] = (keep[k][i] ? xhat[k][i] * scale : 0.0f) + rv[i];
        }
      }
    }
    float a_xhat = 0.0f, a_one = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        // g = 0 past the row's end (dy loaded as 0), so those columns add nothing.
        xhat[k][i] = col + i < n ? (xhat[k][i] - mean) * rstd : 0.0f;
        if constexpr (GELU) g[k][i] *= gelu_erf_grad(xhat[k][i] * w[k][i] + b[k][i]);
        const float gw = g[k][i] * w[k][i];
        a_xhat += gw * xhat[k][i];
        a_one += gw;
      }
    }
    const float2 c = row_sum2<TPR>(a_xhat, a_one, scratch);
    const float c_xhat = c.x * inv_n, c_one = c.y * inv_n;
    R* dh = static_cast<R*>(p.dh) + row * p.stride_dh;
    T* dx = write_dx ? static_cast<T*>(p.dx) + row * p.stride_dx : nullptr;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
      if (col < n) {
        float out[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          out[i] = (g[k][i] * w[k][i] - xhat[k][i] * c_xhat - c_one) * rstd;
          dw[k][i] += g[k][i] * xhat[k][i];
          db[k][i] += g[k][i];
        }
        store_chunk<VECTOR, R, VEC>(dh, col, n, out);
        if (write_dx) {
          if (dropout) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) out[i] = keep[k][i] ? out[i] * scale : 0.0f;
          }
          store_chunk<VECTOR, T, VEC>(dx, col, n, out);
        }
      }
    }
  }

  // Row groups 0 .. kRowsPerBlock-2 add their sums into shared memory in turn; the last
  // adds its own and writes row blockIdx.x of both partial sets.
  float* dw_out = p.partial + static_cast<int64_t>(blockIdx.x) * n;
  float* db_out = dw_out + p.max_partials * n;
  if constexpr (kRowsPerBlock > 1) {
    for (int turn = 0; turn < kRowsPerBlock; ++turn) {
      if (group == turn) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const int c = (t + k * TPR) * VEC + i;
            if (c < n) {
              const float sw = dw[k][i] + (turn > 0 ? combine[0][c] : 0.0f);
              const float sb = db[k][i] + (turn > 0 ? combine[1][c] : 0.0f);
              if (turn == kRowsPerBlock - 1) {
                dw_out[c] = sw;
                db_out[c] = sb;
              } else {
                combine[0][c] = sw;
                combine[1][c] = sb;
              }
            }
          }
        }
      }
      __syncthreads();
    }
  } else {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = static_cast<int64_t>(t + k * TPR) * VEC;
      if (col < n) {
        store_chunk<VECTOR, float, VEC>(dw_out, col, n, dw[k]);
        store_chunk<VECTOR, float, VEC>(db_out, col, n, db[k]);
      }
    }
  }
}

template <typename T, typename R, int TPR, int NV, int VEC, bool VECTOR>
__global__ void __launch_bounds__(block_threads<TPR>()) _add_layernorm_bwd_kernel(const LayerNormBwdParams p) {
  // Block b owns rows b * K + g, (b + gridDim) * K + g, ... (K rows per block, g = thread / TPR)
  // and row b of both partial-sum sets.
  bwd_rows<T, R, TPR, NV, VEC, VECTOR, false>(p);
}

template <typename T, int TPR, int NV, int VEC, bool VECTOR>
__global__ void __launch_bounds__(block_threads<TPR>()) _layernorm_gelu_bwd_kernel(const LayerNormBwdParams p) {
  // Block b owns rows b * K + g, (b + gridDim) * K + g, ... (K rows per block, g = thread / TPR)
  // and row b of both partial-sum sets.
  bwd_rows<T, T, TPR, NV, VEC, VECTOR, true>(p);
}

// ----------------------------------------------------------------------------- launchers

template <typename T, typename R, int TPR, int NV, int VEC, bool VECTOR, bool GELU>
void fwd_run(const LayerNormFwdParams& p) {
  constexpr int kRowsPerBlock = block_threads<TPR>() / TPR;
  const int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  FASTBERT_CHECK_ARG(blocks <= INT32_MAX, "layernorm: too many rows");
  const dim3 grid(static_cast<unsigned>(blocks)), block(block_threads<TPR>());
  if constexpr (GELU) {
    const auto kernel = _layernorm_gelu_fwd_kernel<T, TPR, NV, VEC, VECTOR>;
    FASTBERT_LAUNCH(kernel, grid, block, p.stream, p);
    FASTBERT_LAUNCH_CHECK("_layernorm_gelu_fwd_kernel");
  } else {
    const auto kernel = _add_layernorm_fwd_kernel<T, R, TPR, NV, VEC, VECTOR>;
    FASTBERT_LAUNCH(kernel, grid, block, p.stream, p);
    FASTBERT_LAUNCH_CHECK("_add_layernorm_fwd_kernel");
  }
}

template <typename T, typename R, int TPR, int NV, int VEC, bool VECTOR, bool GELU>
void bwd_run(const LayerNormBwdParams& p) {
  constexpr int kRowsPerBlock = block_threads<TPR>() / TPR;
  // One wave of resident blocks (at most max_partials, the rows of `partial`), each looping
  // over rows: the partial sums stay a few percent of the traffic.
  static const int64_t resident =
      GELU ? resident_blocks(_layernorm_gelu_bwd_kernel<T, TPR, NV, VEC, VECTOR>, block_threads<TPR>())
           : resident_blocks(_add_layernorm_bwd_kernel<T, R, TPR, NV, VEC, VECTOR>, block_threads<TPR>());
  int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  blocks = blocks < resident ? blocks : resident;
  blocks = blocks < p.max_partials ? blocks : p.max_partials;
  const dim3 grid(static_cast<unsigned>(blocks)), block(block_threads<TPR>());
  if constexpr (GELU) {
    const auto kernel = _layernorm_gelu_bwd_kernel<T, TPR, NV, VEC, VECTOR>;
    FASTBERT_LAUNCH(kernel, grid, block, p.stream, p);
    FASTBERT_LAUNCH_CHECK("_layernorm_gelu_bwd_kernel");
  } else {
    const auto kernel = _add_layernorm_bwd_kernel<T, R, TPR, NV, VEC, VECTOR>;
    FASTBERT_LAUNCH(kernel, grid, block, p.stream, p);
    FASTBERT_LAUNCH_CHECK("_add_layernorm_bwd_kernel");
  }
  column_sums(p.partial, p.max_partials, blocks, p.cols, 2, p.dweight, p.dbias, p.param_dtype, p.stream);
}

// Chunks of 16 bytes need every row start and parameter 16-byte aligned and N % VEC == 0.
template <typename T, bool GELU>
bool fwd_vector_ok(const LayerNormFwdParams& p) {
  constexpr int V = Vec16<T>::kSize;
  return p.cols % V == 0 && aligned16(p.x) && aligned16(p.y) && aligned16(p.weight) && aligned16(p.bias) &&
         p.stride_x % V == 0 && p.stride_y % V == 0 && (GELU || (aligned16(p.residual) && p.stride_r % V == 0)) &&
         (!p.y_copy || (aligned16(p.y_copy) && p.stride_y_copy % V == 0));
}

template <typename T, typename R, bool GELU>
bool bwd_vector_ok(const LayerNormBwdParams& p) {
  constexpr int V = Vec16<T>::kSize;
  const bool write_dx = (!GELU && p.dropout_p > 0.0f) || !std::is_same<T, R>::value;
  return p.cols % V == 0 && aligned16(p.dy) && aligned16(p.x) && aligned16(p.dh) && aligned16(p.weight) &&
         p.stride_dy % V == 0 && p.stride_x % V == 0 && p.stride_dh % V == 0 &&
         (GELU || (aligned16(p.residual) && p.stride_r % V == 0)) && (!GELU || aligned16(p.bias)) &&
         (!write_dx || (aligned16(p.dx) && p.stride_dx % V == 0)) &&
         (!p.dy_copy || (aligned16(p.dy_copy) && p.stride_dy_copy % V == 0));
}

// The smallest configuration whose row capacity (TPR * NV chunks) covers the row.
// Forward: up to 32 values per thread (the row and nothing else lives in registers).
// Backward: up to 16 (xhat, g, w, b, dw, db of each column live in registers), so wider
// rows take more threads.
template <typename T, typename R, bool GELU>
void fwd_launch(const LayerNormFwdParams& p) {
  constexpr int V = Vec16<T>::kSize;
  if (fwd_vector_ok<T, GELU>(p)) {
    const int64_t chunks = p.cols / V;
    if (chunks <= 32) fwd_run<T, R, 32, 1, V, true, GELU>(p);
    else if (chunks <= 64) fwd_run<T, R, 32, 2, V, true, GELU>(p);
    else if (chunks <= 128) fwd_run<T, R, 32, 4, V, true, GELU>(p);
    else if (chunks <= 256) fwd_run<T, R, 128, 2, V, true, GELU>(p);
    else if (chunks <= 512) fwd_run<T, R, 128, 4, V, true, GELU>(p);
    else if constexpr (V == 4) fwd_run<T, R, 256, 4, V, true, GELU>(p);  // float32 only: 1024 chunks
  } else {
    const int64_t chunks = (p.cols + 3) / 4;
    if (chunks <= 64) fwd_run<T, R, 32, 2, 4, false, GELU>(p);
    else fwd_run<T, R, 256, 4, 4, false, GELU>(p);
  }
}

template <typename T, typename R, bool GELU>
void bwd_launch(const LayerNormBwdParams& p) {
  constexpr int V = Vec16<T>::kSize;
  if (bwd_vector_ok<T, R, GELU>(p)) {
    const int64_t chunks = p.cols / V;
    if (chunks <= 32) bwd_run<T, R, 32, 1, V, true, GELU>(p);
    else if (chunks <= 64) bwd_run<T, R, 32, 2, V, true, GELU>(p);
    else if (chunks <= 128) bwd_run<T, R, 128, 1, V, true, GELU>(p);
    else if (chunks <= 256) bwd_run<T, R, 128, 2, V, true, GELU>(p);
    else if (chunks <= 512) bwd_run<T, R, 256, 2, V, true, GELU>(p);
    else if constexpr (V == 4) bwd_run<T, R, 512, 2, V, true, GELU>(p);  // float32 only: 1024 chunks
  } else {
    const int64_t chunks = (p.cols + 3) / 4;
    if (chunks <= 64) bwd_run<T, R, 32, 2, 4, false, GELU>(p);
    else bwd_run<T, R, 512, 2, 4, false, GELU>(p);
  }
}

// Explicit instantiations live in layernorm_{fwd,bwd}_{f32,f16,bf16}.cu (2 cores compile
// them in parallel); layernorm.cu only declares them.
#define FASTBERT_LAYERNORM_INSTANTIATE_FWD(T)                        \
  template void fwd_launch<T, T, false>(const LayerNormFwdParams&);   \
  template void fwd_launch<T, T, true>(const LayerNormFwdParams&);
#define FASTBERT_LAYERNORM_INSTANTIATE_BWD(T)                        \
  template void bwd_launch<T, T, false>(const LayerNormBwdParams&);   \
  template void bwd_launch<T, T, true>(const LayerNormBwdParams&);

}  // namespace layernorm
}  // namespace fastbert

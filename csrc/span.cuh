// span.cuh: span_score, the topk best answer spans per row (fastbert/ops/span.py and
// kernels/span.py give the definition; this kernel returns the same bits).
//
// A span (i, j) of a row is a candidate when i <= j < i + D (D = min(max_answer_len, L)),
// both ends are allowed by the mask and its score, the single fp32 add s_i + e_j, is not
// -inf. Writing j = i + d, its flat index f = i * D + d orders spans by (i, j). As in the
// Triton kernel, one int64 key carries both orders:
//
//   key = skey(score) << 32 | (2^31 - 1 - f)
//
// skey maps the fp32 score to an int32 that orders like the float (-0.0 first made +0.0,
// negative floats' magnitude bits flipped, every NaN -> INT32_MAX, above +inf), so "larger
// key" = higher score, then smaller (i, j). Keys of distinct spans are distinct: the
// selection below is exact and tie-free. kEmpty (INT64_MIN, high word INT32_MIN) is
// below every real key, whose high word is at least skey(-FLT_MAX) > INT32_MIN.
//
// One block per row, W warps (W = 1 for large batches, 4 when rows are few). Each warp
// walks its share of the candidate grid in tiles of (kItems * 32 / DW) starts x DW
// offsets (DW = min(next_pow2(D), 32) lanes across d, so short spans do not idle lanes);
// a lane holds kItems keys in registers. The warp's running top-k lives one key per lane
// (lane r: r-th best, r < topk), sorted across lanes; thresh = the key in lane topk - 1.
// A candidate not above thresh is dropped at once; the others are inserted one at a time,
// each in O(1) warp operations: p = popc(ballot(list > c)) lanes stay, lanes > p shift down
// (shfl_up), lane p takes c. On random logits few candidates beat thresh after the first
// tiles. Work per row O(L * D), state O(topk); never an (L, L) or (L, D) buffer. Warps
// then merge: warp 0 inserts the other warps' sorted lists (stopping at the first key not
// above thresh). Lanes r < topk of warp 0 decode and write slot r: -1 / -inf where empty.
#pragma once

#include "fastbert.h"

namespace fastbert {
namespace span {

constexpr int kItems = 8;      // candidates per lane per tile
constexpr int kMaxWarps = 4;
constexpr int64_t kEmpty = INT64_MIN;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ int64_t make_key(float score, int64_t flat) {
  if (score == 0.0f) score = 0.0f;  // -0.0 ties with +0.0
  int32_t bits = __float_as_int(score);
  int32_t skey = bits < 0 ? bits ^ 0x7fffffff : bits;
  if (score != score) skey = 0x7fffffff;  // every NaN above +inf, as torch.sort ranks NaN
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(skey)) << 32;
  return static_cast<int64_t>(high | static_cast<uint64_t>(0x7fffffffll - flat));
}

// Insert c (> thresh, the same value in every lane) into the warp's sorted list.
__device__ __forceinline__ void insert(int64_t c, int64_t& list, int64_t& thresh, int lane, int topk) {
  const int p = __popc(__ballot_sync(kFull, lane < topk && list > c));  // < topk since c > thresh
  const int64_t above = __shfl_up_sync(kFull, list, 1);
  if (lane > p) list = above;
  else if (lane == p) list = c;
  thresh = __shfl_sync(kFull, list, topk - 1);
}

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * 32) _span_score_fwd_kernel(const SpanScoreParams p, int dw_log2) {
  // Block b owns row b: every candidate span of it and its topk output slots.
  __shared__ int64_t lists[kMaxWarps][32];
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int topk = static_cast<int>(p.topk);
  const int64_t L = p.L, D = p.D;
  const T* s_row = static_cast<const T*>(p.start_logits) + row * p.stride_sb;
  const T* e_row = static_cast<const T*>(p.end_logits) + row * p.stride_eb;
  const uint8_t* m_row = p.mask ? p.mask + row * p.stride_mb : nullptr;

  const int dw = 1 << dw_log2;               // lanes across d
  const int lane_d = lane & (dw - 1), lane_i = lane >> dw_log2;
  const int iw = 32 >> dw_log2;              // lanes across i
  const int64_t tile_i = int64_t{kItems} * iw;  // starts per tile
  const int64_t tiles_i = (L + tile_i - 1) / tile_i;
  const int64_t tiles_d = (D + dw - 1) / dw;

  int64_t list = kEmpty, thresh = kEmpty;
  for (int64_t tile = warp; tile < tiles_i * tiles_d; tile += warps) {
    const int64_t i0 = (tile / tiles_d) * tile_i + lane_i;
    const int64_t d = (tile % tiles_d) * dw + lane_d;
    int64_t key[kItems];
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      const int64_t i = i0 + int64_t{q} * iw, j = i + d;
      key[q] = kEmpty;
      if (d < D && j < L) {  // j < L implies i < L
        bool ok = m_row == nullptr || (m_row[i * p.stride_ml] != 0 && m_row[j * p.stride_ml] != 0);
        const float score = __fadd_rn(to_float(s_row[i * p.stride_sl]), to_float(e_row[j * p.stride_el]));
        ok = ok && score != -INFINITY;
        const int64_t k = make_key(score, i * D + d);
        if (ok && k > thresh) key[q] = k;
      }
    }
    // Insert this lane's best while it beats thresh, lowest such lane first.
    int64_t best = kEmpty;
#pragma unroll
    for (int q = 0; q < kItems; ++q) best = key[q] > best ? key[q] : best;
    unsigned pending = __ballot_sync(kFull, best > thresh);
    while (pending) {
      const int src = __ffs(pending) - 1;
      const int64_t c = __shfl_sync(kFull, best, src);
      insert(c, list, thresh, lane, topk);
      best = kEmpty;
#pragma unroll
      for (int q = 0; q < kItems; ++q) {
        if (key[q] == c || key[q] <= thresh) key[q] = kEmpty;  // keys are distinct: c only at src
        best = key[q] > best ? key[q] : best;
      }
      pending = __ballot_sync(kFull, best > thresh);
    }
  }

  if (warps > 1) {
    lists[warp][lane] = list;
    __syncthreads();
    if (warp != 0) return;
    for (int w = 1; w < warps; ++w) {
      for (int r = 0; r < topk; ++r) {
        const int64_t c = lists[w][r];  // sorted: once one is not above thresh, none after is
        if (c <= thresh) break;
        insert(c, list, thresh, lane, topk);
      }
    }
  }

  if (lane < topk) {
    const int64_t out = row * p.topk + lane;
    const int32_t high = static_cast<int32_t>(static_cast<uint64_t>(list) >> 32);
    if (high == INT32_MIN) {  // empty slot: fewer allowed spans than topk
      p.start_index[out] = -1;
      p.end_index[out] = -1;
      p.score[out] = -INFINITY;
    } else {
      const int64_t flat = 0x7fffffffll - static_cast<int64_t>(static_cast<uint64_t>(list) & 0xffffffffull);
      const int64_t i = flat / D;
      p.start_index[out] = i;
      p.end_index[out] = i + flat % D;
      p.score[out] = __int_as_float(high < 0 ? high ^ 0x7fffffff : high);
    }
  }
}

}  // namespace span
}  // namespace fastbert

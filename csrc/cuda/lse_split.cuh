// The lse pass split over keys (flash-decoding style), shared by the SIMT
// (importance.cu) and tensor-core (importance_mma.cu) lse kernels.
//
// A window of a few queries over a long prompt gives the lse pass a handful of
// (query tile, head) blocks that each walk every key: a few dozen blocks on a
// GPU with a hundred SMs or more. With p.lse_splits = Z > 1 the grid gets a
// third dimension: block (x, h, z) walks only the z-th of Z equal runs of whole
// key tiles and writes its partial online-softmax state (max m_z, sum l_z of
// exp(x - m_z)) to p.lse_partials; lse_combine_kernel then merges the Z states
// of each query: lse = M + log(sum_z l_z exp(m_z - M)), M = max_z m_z. With
// Z = 1 the kernels write lse directly, as before.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include "launchers.h"
#include "tiling.cuh"

namespace prefixkv {
namespace cuda {

struct KeyRange {
  int begin;
  int end;
};

// Keys [begin, end) of split z out of `splits`, in whole tiles of `tile` keys.
__device__ __forceinline__ KeyRange split_keys(int num_keys, int tile, int z, int splits) {
  const int tiles = (num_keys + tile - 1) / tile;
  const int per_split = (tiles + splits - 1) / splits;
  const int begin = min(num_keys, z * per_split * tile);
  return {begin, min(num_keys, begin + per_split * tile)};
}

// Partial state `which` (0: max, 1: sum) of split z for query head h, token t.
__device__ __forceinline__ float* lse_partial(const ImportanceParams& p, int which, int z, int h,
                                              int64_t t) {
  return p.lse_partials +
         ((static_cast<int64_t>(which) * p.lse_splits + z) * p.num_q_heads + h) * p.num_tokens + t;
}

// Stores a query's state over its keys (natural-log max m, sum l of exp(x - m)):
// the lse itself without splits, the partial state of split z otherwise.
__device__ __forceinline__ void store_lse_state(const ImportanceParams& p, int h, int64_t t, int z,
                                                float m, float l) {
  if (p.lse_splits == 1) {
    p.lse[static_cast<int64_t>(h) * p.lse_stride_head + t * p.lse_stride_token] =
        l == 0.f ? -INFINITY : m + logf(l);  // NaN propagates
  } else {
    *lse_partial(p, 0, z, h, t) = m;
    *lse_partial(p, 1, z, h, t) = l;
  }
}

// One thread per query row of a kRows-row tile, block (tile, h): the same tiles,
// and the same exits, as the lse kernels, so it reads exactly the partial
// states they wrote.
template <int kRows>
__global__ void __launch_bounds__(kRows) lse_combine_kernel(const ImportanceParams p) {
  const int b = find_sequence_of_tile<kRows>(p.query_start_loc, static_cast<int>(p.num_seqs), blockIdx.x);
  if (b < 0) return;
  const int q_begin = p.query_start_loc[b];
  const int q_len = p.query_start_loc[b + 1] - q_begin;
  const int row0 = static_cast<int>(blockIdx.x - tile_base<kRows>(p.query_start_loc, b)) * kRows;
  if (row0 >= q_len) return;
  const int num_rows = min(kRows, q_len - row0);
  if (p.seq_lens[b] - q_len + row0 + num_rows <= p.min_query_pos[b]) return;
  const int r = threadIdx.x;
  if (r >= num_rows) return;
  const int h = blockIdx.y;
  const int64_t t = static_cast<int64_t>(q_begin) + row0 + r;
  float max_all = -INFINITY;
  for (int z = 0; z < p.lse_splits; ++z) max_all = fmaxf(max_all, *lse_partial(p, 0, z, h, t));
  float sum = 0.f;
  for (int z = 0; z < p.lse_splits; ++z) {
    const float l = *lse_partial(p, 1, z, h, t);
    if (l != 0.f) sum += l * expf(*lse_partial(p, 0, z, h, t) - max_all);  // an empty split adds nothing
  }
  p.lse[static_cast<int64_t>(h) * p.lse_stride_head + t * p.lse_stride_token] =
      sum == 0.f ? -INFINITY : max_all + logf(sum);
}

// After an lse kernel with kRows-row query tiles: merges the splits (none to merge with one).
template <int kRows>
cudaError_t launch_lse_combine(const ImportanceParams& p, int64_t grid_x, cudaStream_t stream) {
  if (p.lse_splits == 1) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(p.num_q_heads));
  lse_combine_kernel<kRows><<<grid, kRows, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace prefixkv

// Device helpers shared by the SIMT (importance.cu) and tensor-core
// (importance_mma.cu) importance kernels: paged key rows and the mapping of a
// flat grid onto per-sequence query tiles.
#pragma once

#include <cstdint>

#include "launchers.h"

namespace prefixkv {
namespace cuda {

// Paged key row (token position `pos`, KV head `g`) of one sequence.
template <typename KT>
__device__ __forceinline__ const KT* key_row(const ImportanceParams& p, const KT* key_cache,
                                             const int32_t* bt_row, int pos, int g) {
  const int64_t block = bt_row[static_cast<int64_t>(pos / p.block_size) * p.bt_stride_col];
  const int64_t slot = pos % p.block_size;
  return key_cache + block * p.k_stride_block + slot * p.k_stride_slot +
         static_cast<int64_t>(g) * p.k_stride_head;
}

// Query tiles of kTile rows are aligned to sequences: sequence b owns the tile
// indices [A(b), A(b + 1)) with A(b) = query_start_loc[b] / kTile + b. A is
// strictly increasing and A(b + 1) - A(b) = floor((query_start_loc[b] % kTile
// + q_len) / kTile) + 1 >= ceil(q_len / kTile), so every sequence gets enough
// tiles and A(B) <= num_tokens / kTile + B bounds the grid without reading the
// device.
template <int kTile>
__device__ __forceinline__ int64_t tile_base(const int32_t* query_start_loc, int b) {
  return static_cast<int64_t>(query_start_loc[b] / kTile) + b;
}

template <int kTile>
inline int64_t num_query_tile_slots(int64_t num_tokens, int64_t num_seqs) {
  return num_tokens / kTile + num_seqs;  // >= A(B), see tile_base
}

// Last b in [0, num_seqs) with tile_base(b) <= x, or -1.
template <int kTile>
__device__ __forceinline__ int find_sequence_of_tile(const int32_t* query_start_loc,
                                                     int num_seqs, int64_t x) {
  if (num_seqs <= 0 || tile_base<kTile>(query_start_loc, 0) > x) return -1;
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (tile_base<kTile>(query_start_loc, mid) <= x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace cuda
}  // namespace prefixkv

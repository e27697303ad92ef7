// Device helpers shared by the SIMT (importance.cu) and tensor-core
// (importance_mma.cu) importance kernels: paged key rows and the mapping of a
// flat grid onto per-sequence query tiles.
#pragma once

#include <cstdint>

#include "launchers.h"

namespace prefixkv {
namespace cuda {

constexpr int kMmaTileRows = 64;  // rows of the tensor-core kernels' resident tile

// Paged key row (token position `pos`, KV head `g`) of one sequence.
template <typename KT>
__device__ __forceinline__ const KT* key_row(const ImportanceParams& p, const KT* key_cache,
                                             const int32_t* bt_row, int pos, int g) {
  const int64_t block = bt_row[static_cast<int64_t>(pos / p.block_size) * p.bt_stride_col];
  const int64_t slot = pos % p.block_size;
  return key_cache + block * p.k_stride_block + slot * p.k_stride_slot +
         static_cast<int64_t>(g) * p.k_stride_head;
}

// What the score kernels need to know about sequence b (grid index z).
struct ScoredSequence {
  int q_begin;    // first query row of the sequence in the packed query tensor
  int q_len;      // queries of this chunk
  int num_keys;   // keys that get scores: min(seq_len, max_keys); later keys still count in lse
  int first_pos;  // absolute position of query 0
  int min_pos;    // queries before this position are not scored (observation window)
  int group;      // query heads per KV head
};

__device__ __forceinline__ ScoredSequence scored_sequence(const ImportanceParams& p, int b) {
  ScoredSequence s;
  s.q_begin = p.query_start_loc[b];
  s.q_len = p.query_start_loc[b + 1] - s.q_begin;
  const int seq_len = p.seq_lens[b];
  s.num_keys = static_cast<int>(min(static_cast<int64_t>(seq_len), p.max_keys));
  s.first_pos = seq_len - s.q_len;
  s.min_pos = p.min_query_pos[b];
  s.group = static_cast<int>(p.num_q_heads / p.num_kv_heads);
  return s;
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

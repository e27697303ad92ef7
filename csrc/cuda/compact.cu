// CUDA kernels of prefixkv.compact (semantics: prefixkv_vllm/ops/reference.py).
//
// One call moves a whole step: items are (request, layer) pairs. For item i and
// KV head g, token slot t < n (n = num_kept[i]) receives what slot src(t) =
// keep_indices[i, g or 0, t] held before. src is strictly increasing, hence
// src(t) >= t. The copy is in place, so order matters: a fully parallel copy is
// wrong (slot t may be src(t') of some t' < t and be overwritten before t' reads
// it). Two kernels, in stream order, make it safe by construction:
//
// Split each (i, g) at m = #{t : src(t) < n}; as src increases, the "head"
// t < m reads slots inside the destination range [0, n), the "tail" t >= m
// reads slots >= n, which no token writes (every destination is < n).
//   1. compact_head_kernel: one thread block per (item, head, cache) walks the
//      head in tiles [t0, t1), each in three barrier-separated phases (resolve
//      offsets, read every source row of the tile into shared memory, write
//      them). Why no read sees a clobbered slot: the source src(t) of a head
//      token in tile k is only written as the destination of token src(t) >= t,
//      by tile k itself (after the barrier that ends the tile's reads), by a later
//      tile, or by the tail in kernel 2, after this kernel has finished.
//   2. compact_tail_kernel: the tail, fully parallel over (item, head, chunk of
//      tokens) and 16-byte words. Its reads (slots >= n) are never written; its
//      writes (slots [m, n)) are read only by head tokens, in kernel 1.
// Tokens with src(t) == t are skipped: nobody else reads or writes that slot.
// Different items touch disjoint memory (other blocks or other layers' caches;
// the reference requires it too).
//
// The copy is byte-wise (vectorised up to 16 bytes when every address of every
// layer is aligned), so any cache element type works, fp8 included.
//
// No torch headers: this file builds with plain nvcc.

#include <cstdint>

#include <cuda_runtime.h>

#include "launchers.h"

namespace prefixkv {
namespace cuda {
namespace {

constexpr int kCompactThreads = 256;
constexpr int64_t kTileBudgetBytes = 32 * 1024;  // shared bytes for staged rows (head)
constexpr int64_t kMaxTileTokens = 1024;
constexpr int kTailTokens = 64;  // tail tokens per thread block
constexpr size_t kDefaultSmemBytes = 48 * 1024;

struct Item {
  bool valid;
  int64_t layer;
  int64_t count;           // n, clamped to [0, K]
  const int32_t* keep;     // src(t) at keep[t * ki_stride_pos]
  const int32_t* bt_row;
};

__device__ __forceinline__ Item load_item(const CompactParams& p, int64_t i, int64_t g) {
  Item it;
  it.layer = p.layers[i];
  int64_t count = p.num_kept[i];
  it.count = count > p.max_keep ? p.max_keep : count;
  it.valid = it.layer >= 0 && it.layer < p.num_layers && it.count > 0;
  it.keep = p.keep_indices + i * p.ki_stride_req + (p.num_keep_heads == 1 ? 0 : g) * p.ki_stride_head;
  it.bt_row = p.block_table + i * p.bt_stride_row;
  return it;
}

// m = #{t < n : src(t) < n}: the head's length (binary search, src increases).
__device__ __forceinline__ int64_t head_length(const CompactParams& p, const Item& it) {
  int64_t lo = 0, hi = it.count;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (it.keep[mid * p.ki_stride_pos] < it.count) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Token `pos` as (block id, slot), or block -1 when `pos` falls outside the
// item's block-table row or its block id is out of range (invalid input that the
// CPU backend rejects; skipped here rather than faulting).
struct Slot {
  int64_t block;
  int64_t slot;
};

__device__ __forceinline__ Slot token_slot(const CompactParams& p, const Item& it, int64_t pos) {
  if (pos < 0 || pos / p.block_size >= p.max_blocks) return {-1, 0};
  const int64_t block = it.bt_row[(pos / p.block_size) * p.bt_stride_col];
  if (block < 0 || block >= p.num_blocks) return {-1, 0};
  return {block, pos % p.block_size};
}

__device__ __forceinline__ char* row_address(const CompactParams& p, bool values, int64_t layer,
                                             Slot s, int64_t g) {
  const CompactCacheLayout& c = values ? p.values : p.keys;
  char* base = static_cast<char*>(values ? p.value_caches[layer] : p.key_caches[layer]);
  return base + (s.block * c.stride_block + s.slot * c.stride_slot + g * c.stride_head) * c.element_size;
}

template <typename VecT>
__global__ void __launch_bounds__(kCompactThreads)
    compact_head_kernel(const CompactParams p, const int tile_tokens) {
  // Layout: s_src[tile], s_dst[tile] (row addresses), then the staged rows. The
  // row area starts at 16 * tile bytes, so it is 16-byte aligned.
  extern __shared__ uint4 smem_raw[];
  char** s_src = reinterpret_cast<char**>(smem_raw);
  char** s_dst = s_src + tile_tokens;
  VecT* s_rows = reinterpret_cast<VecT*>(s_dst + tile_tokens);

  const int64_t g = blockIdx.x;
  const int64_t i = blockIdx.y;
  const bool values = blockIdx.z == 1;
  const Item it = load_item(p, i, g);
  if (!it.valid) return;  // block-uniform
  const int64_t m = head_length(p, it);
  const CompactCacheLayout& c = values ? p.values : p.keys;
  const int64_t row_vecs = c.head_dim * c.element_size / static_cast<int64_t>(sizeof(VecT));

  for (int64_t t0 = 0; t0 < m; t0 += tile_tokens) {
    const int64_t n = m - t0 < tile_tokens ? m - t0 : tile_tokens;
    // Phase 1: resolve addresses. nullptr in s_src means "skip this token".
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      const int64_t t = t0 + k;
      const int64_t src = it.keep[t * p.ki_stride_pos];
      const Slot from = token_slot(p, it, src);
      const Slot to = token_slot(p, it, t);
      const bool moves = src != t && from.block >= 0 && to.block >= 0;
      s_src[k] = moves ? row_address(p, values, it.layer, from, g) : nullptr;
      s_dst[k] = moves ? row_address(p, values, it.layer, to, g) : nullptr;
    }
    __syncthreads();
    // Phase 2: read all source rows of the tile.
    const int64_t total = n * row_vecs;
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
      const int64_t k = e / row_vecs;
      if (s_src[k] != nullptr) s_rows[e] = reinterpret_cast<const VecT*>(s_src[k])[e - k * row_vecs];
    }
    __syncthreads();  // every read of this tile precedes every write
    // Phase 3: write them to slots t0 .. t0 + n - 1.
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
      const int64_t k = e / row_vecs;
      if (s_src[k] != nullptr) reinterpret_cast<VecT*>(s_dst[k])[e - k * row_vecs] = s_rows[e];
    }
    __syncthreads();  // shared buffers are reused by the next tile
  }
}

// Copies `rows` staged (source, destination) row pairs of one cache, word by word.
template <typename VecT>
__device__ __forceinline__ void copy_rows(char* const* s_src, char* const* s_dst, int64_t rows,
                                          int64_t row_vecs) {
  for (int64_t e = threadIdx.x; e < rows * row_vecs; e += blockDim.x) {
    const int64_t k = e / row_vecs;
    if (s_src[k] != nullptr) {
      reinterpret_cast<VecT*>(s_dst[k])[e - k * row_vecs] =
          reinterpret_cast<const VecT*>(s_src[k])[e - k * row_vecs];
    }
  }
}

template <typename VecT>
__global__ void __launch_bounds__(kCompactThreads) compact_tail_kernel(const CompactParams p) {
  __shared__ char* s_src[2][kTailTokens];  // [keys, values][token]
  __shared__ char* s_dst[2][kTailTokens];
  const int64_t i = blockIdx.x / p.num_kv_heads;
  const int64_t g = blockIdx.x % p.num_kv_heads;
  const Item it = load_item(p, i, g);
  if (!it.valid) return;  // block-uniform
  const int64_t m = head_length(p, it);
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTailTokens; c0 < it.count;
       c0 += static_cast<int64_t>(gridDim.y) * kTailTokens) {
    const int64_t begin = c0 > m ? c0 : m;
    const int64_t end = c0 + kTailTokens < it.count ? c0 + kTailTokens : it.count;
    if (begin >= end) continue;  // block-uniform: this chunk lies in the head
    const int64_t rows = end - begin;
    __syncthreads();  // the previous chunk's copies are done with the staged addresses
    for (int64_t k = threadIdx.x; k < 2 * rows; k += blockDim.x) {
      const bool values = k >= rows;
      const int64_t t = begin + (values ? k - rows : k);
      const Slot from = token_slot(p, it, it.keep[t * p.ki_stride_pos]);
      const Slot to = token_slot(p, it, t);
      const bool moves = from.block >= 0 && to.block >= 0;  // src >= n > t: never in place
      s_src[values][k % rows] = moves ? row_address(p, values, it.layer, from, g) : nullptr;
      s_dst[values][k % rows] = moves ? row_address(p, values, it.layer, to, g) : nullptr;
    }
    __syncthreads();
    const int64_t vec = static_cast<int64_t>(sizeof(VecT));
    copy_rows<VecT>(s_src[0], s_dst[0], rows, p.keys.head_dim * p.keys.element_size / vec);
    copy_rows<VecT>(s_src[1], s_dst[1], rows, p.values.head_dim * p.values.element_size / vec);
  }
}

bool aligned_to(int64_t value, int64_t alignment) { return value % alignment == 0; }

int64_t row_bytes(const CompactCacheLayout& c) { return c.head_dim * c.element_size; }

template <typename VecT>
cudaError_t launch_typed(const CompactParams& p, cudaStream_t stream) {
  const int64_t widest_row = row_bytes(p.keys) > row_bytes(p.values) ? row_bytes(p.keys) : row_bytes(p.values);
  int64_t tile = kTileBudgetBytes / (widest_row + 16);
  if (tile > kMaxTileTokens) tile = kMaxTileTokens;
  if (tile < 1) tile = 1;
  const size_t smem = static_cast<size_t>(tile) * static_cast<size_t>(16 + widest_row);
  if (smem > kDefaultSmemBytes) {
    const cudaError_t err = cudaFuncSetAttribute(
        compact_head_kernel<VecT>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 head_grid(static_cast<unsigned>(p.num_kv_heads), static_cast<unsigned>(p.num_items), 2);
  compact_head_kernel<VecT><<<head_grid, kCompactThreads, smem, stream>>>(p, static_cast<int>(tile));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  int64_t chunks = (p.max_keep + kTailTokens - 1) / kTailTokens;
  if (chunks > 65535) chunks = 65535;  // the kernel strides over the rest
  const dim3 tail_grid(static_cast<unsigned>(p.num_items * p.num_kv_heads), static_cast<unsigned>(chunks));
  compact_tail_kernel<VecT><<<tail_grid, kCompactThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Widest access size that divides every address the kernels form, in every layer.
int64_t common_alignment(const CompactParams& p) {
  int64_t alignment = 16;
  const auto fits = [&](int64_t a) {
    for (const CompactCacheLayout* c : {&p.keys, &p.values}) {
      if (!aligned_to(c->stride_block * c->element_size, a) || !aligned_to(c->stride_slot * c->element_size, a) ||
          !aligned_to(c->stride_head * c->element_size, a) || !aligned_to(row_bytes(*c), a)) {
        return false;
      }
    }
    for (int64_t l = 0; l < p.num_layers; ++l) {
      for (const void* base : {p.key_caches[l], p.value_caches[l]}) {
        if (!aligned_to(static_cast<int64_t>(reinterpret_cast<uintptr_t>(base)), a)) return false;
      }
    }
    return true;
  };
  while (alignment > 1 && !fits(alignment)) alignment /= 2;
  return alignment;
}

}  // namespace

cudaError_t launch_compact(const CompactParams& p, cudaStream_t stream) {
  if (p.num_items < 0 || p.num_kv_heads < 0 || p.block_size <= 0 || p.num_layers < 0 ||
      p.num_layers > kMaxCompactLayers || (p.num_keep_heads != 1 && p.num_keep_heads != p.num_kv_heads)) {
    return cudaErrorInvalidValue;
  }
  if (p.num_items == 0 || p.num_kv_heads == 0 || p.num_layers == 0 || p.max_keep <= 0 ||
      p.max_blocks <= 0 || p.num_blocks <= 0 || row_bytes(p.keys) <= 0) {
    return cudaSuccess;
  }
  if (p.num_items > 65535 || p.num_items * p.num_kv_heads > 0x7fffffff) return cudaErrorInvalidValue;
  switch (common_alignment(p)) {
    case 16:
      return launch_typed<uint4>(p, stream);
    case 8:
      return launch_typed<uint2>(p, stream);
    case 4:
      return launch_typed<uint32_t>(p, stream);
    case 2:
      return launch_typed<uint16_t>(p, stream);
    default:
      return launch_typed<uint8_t>(p, stream);
  }
}

}  // namespace cuda
}  // namespace prefixkv

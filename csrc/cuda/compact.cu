// CUDA kernel of prefixkv.compact (semantics: prefixkv_vllm/ops/reference.py).
//
// For request r and KV head g, token slot t < n (n = num_kept[r]) receives what
// slot src(t) = keep_indices[r, g or 0, t] held before. src is strictly
// increasing, hence src(t) >= t. The copy is in place, so order matters: a
// fully parallel copy is wrong (slot t may be src(t') of some t' < t and be
// overwritten before t' reads it).
//
// One thread block owns one (request, KV head) of one cache and walks t in
// tiles [t0, t1), each in three barrier-separated phases:
//   1. resolve src(t) and t to byte offsets (shared memory);
//   2. read every source row of the tile into shared memory;
//   3. write the rows to destination slots t0..t1-1.
// Why no read sees a clobbered slot: the source src(t) of a token in tile k is
// only ever written as the destination of token src(t) >= t, i.e. by tile k
// itself (after the barrier that ends this tile's reads) or by a later tile.
// Earlier tiles wrote slots < t0 <= t <= src(t). Different blocks touch
// disjoint memory (different heads, caches, or requests; requests are assumed
// to own disjoint blocks, as the reference also requires).
// Tokens with src(t) == t are skipped: nobody else reads or writes that slot.
//
// The copy is byte-wise (vectorised up to 16 bytes when every address is
// aligned), so any cache element type works, fp8 included.
//
// No torch headers: this file builds with plain nvcc.

#include <cstdint>

#include <cuda_runtime.h>

#include "launchers.h"

namespace prefixkv {
namespace cuda {
namespace {

constexpr int kCompactThreads = 256;
constexpr int64_t kTileBudgetBytes = 32 * 1024;  // shared bytes for staged rows
constexpr int64_t kMaxTileTokens = 1024;
constexpr size_t kDefaultSmemBytes = 48 * 1024;

// One cache (keys or values) as the kernel sees it: byte strides.
struct CacheBytes {
  char* base;
  int64_t stride_block;
  int64_t stride_slot;
  int64_t stride_head;
  int64_t row_bytes;  // head_dim * element_size
};

struct KeepArgs {
  const int32_t* block_table;
  int64_t bt_stride_row;
  int64_t bt_stride_col;
  const int32_t* keep_indices;
  int64_t ki_stride_req;
  int64_t ki_stride_head;
  int64_t ki_stride_pos;
  const int32_t* num_kept;
  int64_t num_keep_heads;  // Hs: 1 (shared) or Hkv
  int64_t max_keep;        // K
  int64_t block_size;
  int64_t max_blocks;
  int64_t num_blocks;
};

// Byte offset of token `pos`'s row for head g, or -1 when `pos` falls outside
// the request's block-table row or its block id is out of range (invalid input
// that the CPU backend rejects; skipped here rather than faulting).
__device__ __forceinline__ int64_t row_offset(const CacheBytes& c, const KeepArgs& k,
                                              const int32_t* bt_row, int64_t pos,
                                              int64_t g) {
  if (pos < 0) return -1;
  const int64_t block_idx = pos / k.block_size;
  if (block_idx >= k.max_blocks) return -1;
  const int64_t block = bt_row[block_idx * k.bt_stride_col];
  if (block < 0 || block >= k.num_blocks) return -1;
  return block * c.stride_block + (pos % k.block_size) * c.stride_slot + g * c.stride_head;
}

template <typename VecT>
__global__ void __launch_bounds__(kCompactThreads)
    compact_kernel(const CacheBytes c, const KeepArgs k, const int tile_tokens) {
  // Layout: s_src[tile], s_dst[tile] (int64), then the staged rows. The row
  // area starts at 16 * tile bytes, so it is 16-byte aligned.
  extern __shared__ uint4 smem_raw[];
  int64_t* s_src = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* s_dst = s_src + tile_tokens;
  VecT* s_rows = reinterpret_cast<VecT*>(s_dst + tile_tokens);

  const int64_t g = blockIdx.x;
  const int64_t r = blockIdx.y;
  int64_t count = k.num_kept[r];
  if (count > k.max_keep) count = k.max_keep;
  if (count <= 0) return;

  const int32_t* keep_row = k.keep_indices + r * k.ki_stride_req +
                            (k.num_keep_heads == 1 ? 0 : g) * k.ki_stride_head;
  const int32_t* bt_row = k.block_table + r * k.bt_stride_row;
  const int64_t row_vecs = c.row_bytes / static_cast<int64_t>(sizeof(VecT));

  for (int64_t t0 = 0; t0 < count; t0 += tile_tokens) {
    const int64_t n = count - t0 < tile_tokens ? count - t0 : tile_tokens;

    // Phase 1: resolve offsets. -1 in s_src means "skip this token".
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const int64_t t = t0 + i;
      const int64_t src = keep_row[t * k.ki_stride_pos];
      int64_t src_off = -1;
      int64_t dst_off = -1;
      if (src != t) {
        src_off = row_offset(c, k, bt_row, src, g);
        dst_off = row_offset(c, k, bt_row, t, g);
        if (dst_off < 0) src_off = -1;
      }
      s_src[i] = src_off;
      s_dst[i] = dst_off;
    }
    __syncthreads();

    // Phase 2: read all source rows of the tile.
    const int64_t total = n * row_vecs;
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
      const int64_t i = e / row_vecs;
      const int64_t src_off = s_src[i];
      if (src_off >= 0) {
        s_rows[e] = reinterpret_cast<const VecT*>(c.base + src_off)[e - i * row_vecs];
      }
    }
    __syncthreads();  // every read of this tile precedes every write

    // Phase 3: write them to slots t0 .. t0 + n - 1.
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
      const int64_t i = e / row_vecs;
      if (s_src[i] >= 0) {
        reinterpret_cast<VecT*>(c.base + s_dst[i])[e - i * row_vecs] = s_rows[e];
      }
    }
    __syncthreads();  // shared buffers are reused by the next tile
  }
}

bool aligned_to(int64_t value, int64_t alignment) { return value % alignment == 0; }

template <typename VecT>
cudaError_t launch_typed(const CacheBytes& c, const KeepArgs& k, int64_t num_requests,
                         int64_t num_kv_heads, cudaStream_t stream) {
  int64_t tile = kTileBudgetBytes / (c.row_bytes + 16);
  if (tile > kMaxTileTokens) tile = kMaxTileTokens;
  if (tile < 1) tile = 1;
  const size_t smem = static_cast<size_t>(tile) * static_cast<size_t>(16 + c.row_bytes);
  if (smem > kDefaultSmemBytes) {
    const cudaError_t err = cudaFuncSetAttribute(
        compact_kernel<VecT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(num_kv_heads), static_cast<unsigned>(num_requests));
  compact_kernel<VecT><<<grid, kCompactThreads, smem, stream>>>(c, k, static_cast<int>(tile));
  return cudaGetLastError();
}

cudaError_t launch_one_cache(const CacheBytes& c, const KeepArgs& k, int64_t num_requests,
                             int64_t num_kv_heads, cudaStream_t stream) {
  if (c.row_bytes <= 0) return cudaSuccess;
  // Widest access size that divides every address the kernel forms.
  const int64_t address = static_cast<int64_t>(reinterpret_cast<uintptr_t>(c.base));
  const auto all_aligned = [&](int64_t a) {
    return aligned_to(address, a) && aligned_to(c.stride_block, a) &&
           aligned_to(c.stride_slot, a) && aligned_to(c.stride_head, a) &&
           aligned_to(c.row_bytes, a);
  };
  if (all_aligned(16)) return launch_typed<uint4>(c, k, num_requests, num_kv_heads, stream);
  if (all_aligned(8)) return launch_typed<uint2>(c, k, num_requests, num_kv_heads, stream);
  if (all_aligned(4)) return launch_typed<uint32_t>(c, k, num_requests, num_kv_heads, stream);
  if (all_aligned(2)) return launch_typed<uint16_t>(c, k, num_requests, num_kv_heads, stream);
  return launch_typed<uint8_t>(c, k, num_requests, num_kv_heads, stream);
}

}  // namespace

cudaError_t launch_compact(const CompactParams& p, cudaStream_t stream) {
  if (p.num_requests < 0 || p.num_kv_heads < 0 || p.block_size <= 0 ||
      (p.num_keep_heads != 1 && p.num_keep_heads != p.num_kv_heads)) {
    return cudaErrorInvalidValue;
  }
  if (p.num_requests == 0 || p.num_kv_heads == 0 || p.max_keep <= 0 || p.max_blocks <= 0 ||
      p.num_blocks <= 0) {
    return cudaSuccess;
  }
  if (p.num_requests > 65535 || p.num_kv_heads > 0x7fffffff) return cudaErrorInvalidValue;

  const KeepArgs k{p.block_table,  p.bt_stride_row,  p.bt_stride_col, p.keep_indices,
                   p.ki_stride_req, p.ki_stride_head, p.ki_stride_pos, p.num_kept,
                   p.num_keep_heads, p.max_keep,      p.block_size,    p.max_blocks,
                   p.num_blocks};
  const CacheBytes keys{static_cast<char*>(p.key_cache), p.k_stride_block * p.k_element_size,
                        p.k_stride_slot * p.k_element_size,
                        p.k_stride_head * p.k_element_size, p.k_head_dim * p.k_element_size};
  const CacheBytes values{static_cast<char*>(p.value_cache),
                          p.v_stride_block * p.v_element_size,
                          p.v_stride_slot * p.v_element_size,
                          p.v_stride_head * p.v_element_size, p.v_head_dim * p.v_element_size};
  cudaError_t err = launch_one_cache(keys, k, p.num_requests, p.num_kv_heads, stream);
  if (err != cudaSuccess) return err;
  return launch_one_cache(values, k, p.num_requests, p.num_kv_heads, stream);
}

}  // namespace cuda
}  // namespace prefixkv

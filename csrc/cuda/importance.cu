// CUDA kernels of prefixkv.importance (semantics: prefixkv_vllm/ops/reference.py).
//
// SIMT kernels for float32 and for the shapes the tensor-core kernels
// (importance_mma.cu) do not take; the launchers at the end pick. Both passes share one
// shape: a block stages two 32-row float tiles in shared memory, a "lane tile"
// whose row is chosen by the lane and a "broadcast tile" whose row is the same
// for the whole warp; each lane computes dot products of length head_dim.
// Rows are padded to head_dim + 1 floats so that 32 lanes reading 32 different
// rows at the same column hit 32 different banks.
//
// Pass 1 (attention_lse_kernel, only when the caller has no lse): block =
//   (32 queries of one sequence, one query head, one key split). Lane r owns
//   query r and keeps an online (max, sum) over the keys its warp visits; key
//   tiles of 32 are staged in shared memory and split across warps; warps are
//   merged at the end. Few query tiles (a scored window) split the keys across
//   blocks too (lse_split.cuh).
// Pass 2 (importance_scores_kernel): block = (sequence, KV head), walking key
//   tiles of 32 keys (grid-stride over tiles). Lane j owns key j of the tile
//   and accumulates exp(scale * q.k - lse) over the group's query heads and the
//   scored causal queries, staged 32 at a time. Each (b, g, key) is written by
//   exactly one thread with a plain +=: no atomics, and deterministic results
//   (a key's summation order does not depend on the grid size or SM count).
//
// Nothing here reads device values on the host: no synchronisation, and the
// launches are safe to capture in a CUDA graph.
//
// No torch headers: this file builds with plain nvcc.

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "launchers.h"
#include "lse_split.cuh"
#include "tiling.cuh"

namespace prefixkv {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kTile = 32;  // rows per shared tile; must equal kWarpSize
static_assert(kTile == kWarpSize, "lanes index tile rows");
constexpr int kLseWarps = 8;
constexpr int kLseThreads = kLseWarps * kWarpSize;
constexpr int kScoreWarps = 8;
constexpr int kScoreThreads = kScoreWarps * kWarpSize;
constexpr size_t kDefaultSmemBytes = 48 * 1024;
constexpr int64_t kMinSplitKeys = 256;  // keys per lse split, at least
constexpr int64_t kMaxLseSplits = 64;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float to_float(__nv_fp8_e4m3 x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__nv_fp8_e5m2 x) { return static_cast<float>(x); }

// Copies up to kTile rows of head_dim elements into a padded float tile
// ([kTile][ld]); rows >= num_rows are zero-filled so that unused lanes compute
// harmless finite values. row_ptr(r) returns the row's first element.
template <typename RowPtr>
__device__ __forceinline__ void load_tile(float* tile, int ld, int head_dim,
                                          int num_rows, RowPtr row_ptr) {
  for (int idx = threadIdx.x; idx < kTile * head_dim; idx += blockDim.x) {
    const int r = idx / head_dim;
    const int d = idx - r * head_dim;
    float v = 0.f;
    if (r < num_rows) v = to_float(row_ptr(r)[d]);
    tile[r * ld + d] = v;
  }
}

template <typename QT, typename KT>
__global__ void __launch_bounds__(kLseThreads)
    attention_lse_kernel(const ImportanceParams p) {
  extern __shared__ float smem[];
  const int head_dim = static_cast<int>(p.head_dim);
  const int ld = head_dim + 1;
  float* s_q = smem;                    // [kTile][ld]  lane tile (queries)
  float* s_k = s_q + kTile * ld;        // [kTile][ld]  broadcast tile (keys)
  float* s_m = s_k + kTile * ld;        // [kLseWarps][kTile]
  float* s_s = s_m + kLseWarps * kTile;  // [kLseWarps][kTile]

  const int num_seqs = static_cast<int>(p.num_seqs);
  const int b = find_sequence_of_tile<kTile>(p.query_start_loc, num_seqs, blockIdx.x);
  if (b < 0) return;
  const int q_begin = p.query_start_loc[b];
  const int q_len = p.query_start_loc[b + 1] - q_begin;
  const int row0 = static_cast<int>(blockIdx.x - tile_base<kTile>(p.query_start_loc, b)) * kTile;
  if (row0 >= q_len) return;  // spare tile of this sequence (uniform exit)
  const int num_rows = min(kTile, q_len - row0);
  const int seq_len = p.seq_lens[b];
  const int first_pos = seq_len - q_len;  // absolute position of query 0
  // The score pass reads no lse below min_query_pos: a window of the last queries
  // needs the lse of its own tiles only (uniform exit).
  if (first_pos + row0 + num_rows <= p.min_query_pos[b]) return;
  const int h = blockIdx.y;
  const int group = static_cast<int>(p.num_q_heads / p.num_kv_heads);
  const int g = h / group;

  const QT* query = static_cast<const QT*>(p.query);
  const KT* key_cache = static_cast<const KT*>(p.key_cache);
  const int32_t* bt_row = p.block_table + static_cast<int64_t>(b) * p.bt_stride_row;

  load_tile(s_q, ld, head_dim, num_rows, [&](int r) {
    const int64_t t = static_cast<int64_t>(q_begin) + row0 + r;
    return query + t * p.q_stride_token + static_cast<int64_t>(h) * p.q_stride_head;
  });

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const bool lane_valid = lane < num_rows;
  const int my_pos = first_pos + row0 + lane;
  // Keys 0..last_key are visible to some query of the tile (causal); this block
  // walks its split of them.
  const int last_key = first_pos + row0 + num_rows - 1;
  const KeyRange keys = split_keys(last_key + 1, kTile, blockIdx.z, static_cast<int>(p.lse_splits));
  const float scale = p.scale;

  // This warp's online softmax state for query `lane` over the keys it visits.
  float m = -INFINITY;
  float s = 0.f;
  const float* q_row = s_q + lane * ld;
  for (int k0 = keys.begin; k0 < keys.end; k0 += kTile) {
    const int nk = min(kTile, keys.end - k0);
    __syncthreads();  // s_q is loaded / previous key tile fully consumed
    load_tile(s_k, ld, head_dim, nk,
              [&](int r) { return key_row(p, key_cache, bt_row, k0 + r, g); });
    __syncthreads();
    for (int j = warp; j < nk; j += kLseWarps) {
      const float* k_row = s_k + j * ld;
      float dot = 0.f;
      for (int d = 0; d < head_dim; ++d) dot = fmaf(q_row[d], k_row[d], dot);
      if (lane_valid && k0 + j <= my_pos) {
        const float x = dot * scale;
        if (x > m) {
          s = s * expf(m - x) + 1.f;  // expf(-inf) == 0 on the first key
          m = x;
        } else {
          s += expf(x - m);
        }
      }
    }
  }
  s_m[warp * kTile + lane] = m;
  s_s[warp * kTile + lane] = s;
  __syncthreads();
  if (warp == 0 && lane_valid) {
    float max_all = -INFINITY;
    for (int w = 0; w < kLseWarps; ++w) max_all = fmaxf(max_all, s_m[w * kTile + lane]);
    float sum = 0.f;
    for (int w = 0; w < kLseWarps; ++w) {
      const float sw = s_s[w * kTile + lane];
      if (sw != 0.f) sum += sw * expf(s_m[w * kTile + lane] - max_all);
    }
    store_lse_state(p, h, static_cast<int64_t>(q_begin) + row0 + lane, blockIdx.z, max_all, sum);
  }
}

template <typename QT, typename KT>
__global__ void __launch_bounds__(kScoreThreads)
    importance_scores_kernel(const ImportanceParams p) {
  extern __shared__ float smem[];
  const int head_dim = static_cast<int>(p.head_dim);
  const int ld = head_dim + 1;
  float* s_k = smem;                        // [kTile][ld]  lane tile (keys)
  float* s_q = s_k + kTile * ld;            // [kTile][ld]  broadcast tile (queries)
  float* s_lse = s_q + kTile * ld;          // [kTile]
  float* s_acc = s_lse + kTile;             // [kScoreWarps][kTile]

  const int g = blockIdx.y;
  const int b = blockIdx.z;
  const ScoredSequence seq = scored_sequence(p, b);
  if (seq.q_len <= 0) return;
  const int q_begin = seq.q_begin, q_len = seq.q_len, num_keys = seq.num_keys;
  const int first_pos = seq.first_pos, min_pos = seq.min_pos, group = seq.group;
  const float scale = p.scale;

  const QT* query = static_cast<const QT*>(p.query);
  const KT* key_cache = static_cast<const KT*>(p.key_cache);
  const int32_t* bt_row = p.block_table + static_cast<int64_t>(b) * p.bt_stride_row;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const float* k_row = s_k + lane * ld;

  const int num_key_tiles = num_keys > 0 ? (num_keys + kTile - 1) / kTile : 0;
  for (int kt = blockIdx.x; kt < num_key_tiles; kt += gridDim.x) {
    const int k0 = kt * kTile;
    const int nk = min(kTile, num_keys - k0);
    // Scored queries that see some key of this tile: position >= k0 (causal)
    // and >= min_pos. Position of query i is first_pos + i.
    const int i_begin = max(0, max(k0, min_pos) - first_pos);
    if (i_begin >= q_len) continue;  // block-uniform

    __syncthreads();  // previous tile's s_k / s_acc readers are done
    load_tile(s_k, ld, head_dim, nk,
              [&](int r) { return key_row(p, key_cache, bt_row, k0 + r, g); });
    const int my_key = k0 + lane;
    const bool lane_valid = lane < nk;
    float acc = 0.f;
    for (int hh = 0; hh < group; ++hh) {
      const int h = g * group + hh;
      for (int i0 = i_begin; i0 < q_len; i0 += kTile) {
        const int nq = min(kTile, q_len - i0);
        __syncthreads();  // s_k is loaded / previous query tile consumed
        load_tile(s_q, ld, head_dim, nq, [&](int r) {
          const int64_t t = static_cast<int64_t>(q_begin) + i0 + r;
          return query + t * p.q_stride_token + static_cast<int64_t>(h) * p.q_stride_head;
        });
        if (tid < nq) {
          const int64_t t = static_cast<int64_t>(q_begin) + i0 + tid;
          s_lse[tid] = p.lse[static_cast<int64_t>(h) * p.lse_stride_head + t * p.lse_stride_token];
        }
        __syncthreads();
        for (int r = warp; r < nq; r += kScoreWarps) {
          const float* q_row = s_q + r * ld;
          float dot = 0.f;
          for (int d = 0; d < head_dim; ++d) dot = fmaf(q_row[d], k_row[d], dot);
          const int pos = first_pos + i0 + r;
          if (lane_valid && my_key <= pos) acc += expf(dot * scale - s_lse[r]);
        }
      }
    }
    s_acc[warp * kTile + lane] = acc;
    __syncthreads();
    if (tid < nk) {
      float total = 0.f;
      for (int w = 0; w < kScoreWarps; ++w) total += s_acc[w * kTile + tid];
      float* out = p.scores + static_cast<int64_t>(b) * p.sc_stride_seq +
                   static_cast<int64_t>(g) * p.sc_stride_head +
                   static_cast<int64_t>(k0 + tid) * p.sc_stride_key;
      *out += total / static_cast<float>(group);
    }
  }
}

size_t lse_smem_bytes(int64_t head_dim) {
  return sizeof(float) * (2 * kTile * (head_dim + 1) + 2 * kLseWarps * kTile);
}

size_t scores_smem_bytes(int64_t head_dim) {
  return sizeof(float) * (2 * kTile * (head_dim + 1) + kTile + kScoreWarps * kTile);
}

template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t smem_bytes) {
  // Host-only attribute, not a stream operation: fine during graph capture.
  if (smem_bytes <= kDefaultSmemBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem_bytes));
}

cudaError_t check_shapes(const ImportanceParams& p) {
  if (p.num_q_heads <= 0 || p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 ||
      p.head_dim < 0 || p.block_size <= 0 || p.num_seqs < 0 || p.num_tokens < 0 ||
      p.max_keys < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs > 65535 || p.num_q_heads > 65535) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename QT, typename KT>
cudaError_t launch_lse_typed(const ImportanceParams& p, cudaStream_t stream) {
  const int64_t grid_x = num_query_tile_slots<kTile>(p.num_tokens, p.num_seqs);
  if (grid_x <= 0 || grid_x > 0x7fffffff) {
    return grid_x <= 0 ? cudaSuccess : cudaErrorInvalidValue;
  }
  const size_t smem = lse_smem_bytes(p.head_dim);
  cudaError_t err = allow_dynamic_smem(attention_lse_kernel<QT, KT>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(p.num_q_heads),
                  static_cast<unsigned>(p.lse_splits));
  attention_lse_kernel<QT, KT><<<grid, kLseThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_lse_combine<kTile>(p, grid_x, stream);
}

template <typename QT, typename KT>
cudaError_t launch_scores_typed(const ImportanceParams& p, int num_sms, cudaStream_t stream) {
  const int64_t max_key_tiles = (p.max_keys + kTile - 1) / kTile;
  const int64_t pairs = p.num_seqs * p.num_kv_heads;
  if (max_key_tiles <= 0 || pairs <= 0) return cudaSuccess;
  if (p.num_kv_heads > 65535) return cudaErrorInvalidValue;
  // Enough blocks to fill the device; each walks key tiles with a grid stride,
  // so no host-side knowledge of the sequence lengths is needed.
  const int64_t target_blocks = static_cast<int64_t>(num_sms) * 16;
  int64_t grid_x = (target_blocks + pairs - 1) / pairs;
  if (grid_x > max_key_tiles) grid_x = max_key_tiles;
  if (grid_x < 1) grid_x = 1;
  const size_t smem = scores_smem_bytes(p.head_dim);
  const cudaError_t err = allow_dynamic_smem(importance_scores_kernel<QT, KT>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(p.num_seqs));
  importance_scores_kernel<QT, KT><<<grid, kScoreThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t multiprocessor_count(int* num_sms) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(num_sms, cudaDevAttrMultiProcessorCount, device);
}

// Calls f(QT*, KT*) (null pointers used as type tags) for the runtime kinds.
template <typename KT, typename F>
cudaError_t dispatch_query(ScalarKind query_kind, F&& f) {
  switch (query_kind) {
    case ScalarKind::kFloat32:
      return f(static_cast<float*>(nullptr), static_cast<KT*>(nullptr));
    case ScalarKind::kFloat16:
      return f(static_cast<__half*>(nullptr), static_cast<KT*>(nullptr));
    case ScalarKind::kBFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr), static_cast<KT*>(nullptr));
    default:  // fp8 queries do not occur
      return cudaErrorInvalidValue;
  }
}

template <typename F>
cudaError_t dispatch_types(ScalarKind query_kind, ScalarKind key_kind, F&& f) {
  switch (key_kind) {
    case ScalarKind::kFloat32:
      return dispatch_query<float>(query_kind, f);
    case ScalarKind::kFloat16:
      return dispatch_query<__half>(query_kind, f);
    case ScalarKind::kBFloat16:
      return dispatch_query<__nv_bfloat16>(query_kind, f);
    case ScalarKind::kFloat8E4M3:
      return dispatch_query<__nv_fp8_e4m3>(query_kind, f);
    case ScalarKind::kFloat8E5M2:
      return dispatch_query<__nv_fp8_e5m2>(query_kind, f);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t attention_lse_splits(const ImportanceParams& p) {
  int num_sms = 0;
  if (check_shapes(p) != cudaSuccess || multiprocessor_count(&num_sms) != cudaSuccess) return 1;
  const int64_t rows = mma_importance_supported(p) ? kMmaTileRows : kTile;
  const int64_t blocks = (p.num_tokens / rows + p.num_seqs) * p.num_q_heads;  // num_query_tile_slots
  // A few resident blocks per SM; no split shorter than kMinSplitKeys keys.
  const int64_t target = static_cast<int64_t>(num_sms) * 4;
  if (blocks <= 0 || blocks >= target) return 1;
  int64_t splits = (target + blocks - 1) / blocks;
  const int64_t longest = (p.max_keys + kMinSplitKeys - 1) / kMinSplitKeys;
  if (splits > longest) splits = longest;
  if (splits > kMaxLseSplits) splits = kMaxLseSplits;
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_attention_lse(const ImportanceParams& p, cudaStream_t stream) {
  const cudaError_t err = check_shapes(p);
  if (err != cudaSuccess) return err;
  if (p.lse_splits < 1 || p.lse_splits > kMaxLseSplits || (p.lse_splits > 1 && p.lse_partials == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (mma_importance_supported(p)) return launch_attention_lse_mma(p, stream);
  return dispatch_types(p.query_kind, p.key_kind, [&](auto* q_tag, auto* k_tag) {
    using QT = std::remove_pointer_t<decltype(q_tag)>;
    using KT = std::remove_pointer_t<decltype(k_tag)>;
    return launch_lse_typed<QT, KT>(p, stream);
  });
}

cudaError_t launch_importance_scores(const ImportanceParams& p, cudaStream_t stream) {
  cudaError_t err = check_shapes(p);
  if (err != cudaSuccess) return err;
  int num_sms = 0;
  err = multiprocessor_count(&num_sms);
  if (err != cudaSuccess) return err;
  if (mma_importance_supported(p)) return launch_importance_scores_mma(p, num_sms, stream);
  return dispatch_types(p.query_kind, p.key_kind, [&](auto* q_tag, auto* k_tag) {
    using QT = std::remove_pointer_t<decltype(q_tag)>;
    using KT = std::remove_pointer_t<decltype(k_tag)>;
    return launch_scores_typed<QT, KT>(p, num_sms, stream);
  });
}

}  // namespace cuda
}  // namespace prefixkv

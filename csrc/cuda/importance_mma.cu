// Tensor-core kernels of prefixkv.importance for float16 / bfloat16 (semantics:
// prefixkv_vllm/ops/reference.py; the SIMT kernels in importance.cu cover
// float32 and the shapes listed at mma_importance_supported).
//
// Both passes multiply a resident tile of 64 rows (queries for the lse pass,
// keys for the score pass) with a streamed tile of 64 rows on the tensor cores
// (WMMA 16x16x16, float accumulation), one 16-row slice of the resident tile
// per warp, and leave the 16 x 64 logits of each warp in shared memory. The
// warp then walks its logits with lane l owning streamed columns l and l + 32,
// so the per-row reductions stay in registers until the resident tile is done:
//
// Pass 1 (attention_lse_mma_kernel): block = (64 queries of one sequence, one
//   query head, one key split: lse_split.cuh). Per query row each lane keeps an
//   online (max, sum) in base 2 over its key columns; warps combine lanes with
//   shuffles at the end.
// Pass 2 (importance_scores_mma_kernel): block = (sequence, KV head), walking
//   key tiles of 64 with a grid stride. Per key row each lane sums
//   exp2(logit * scale * log2 e - lse * log2 e) over its query columns, for
//   every query head of the group and every scored causal query; one warp
//   reduction per key at the end, one plain += per (b, g, key): deterministic.
//
// Only causal work is done: the lse pass stops at the tile's last query
// position, the score pass starts at the first query that can see the tile.
// No S x S buffer and no host reads of device values (capture-safe).
//
// No torch headers: this file builds with plain nvcc.

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "launchers.h"
#include "lse_split.cuh"
#include "tiling.cuh"

namespace prefixkv {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kFrag = 16;                  // WMMA tile edge
constexpr int kWarps = 4;                  // one 16-row slice of the resident tile each
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kResidentRows = kWarps * kFrag;
static_assert(kResidentRows == kMmaTileRows, "attention_lse_splits counts tiles of kMmaTileRows");
constexpr int kStreamedRows = 2 * kWarpSize;  // lane l owns columns l and l + 32
constexpr int kRowPad = 8;                 // 16 bytes per staged row against bank conflicts
constexpr int kLogitLd = kStreamedRows + 4;  // floats; store_matrix_sync needs a multiple of 4
constexpr int kMaxHeadDim = 256;
constexpr size_t kDefaultSmemBytes = 48 * 1024;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kStreamedRows % kFrag == 0, "streamed tile is a whole number of fragments");

// Shared memory: resident [kResidentRows][ld] T, streamed [kStreamedRows][ld] T,
// logits [kResidentRows][kLogitLd] float, then kStreamedRows floats of per-column
// data. With ld = head_dim + kRowPad and head_dim % 16 == 0 every section and
// every fragment pointer is 32-byte aligned, as WMMA requires.
size_t smem_bytes(int64_t head_dim) {
  const size_t ld = static_cast<size_t>(head_dim + kRowPad);
  return 2 * (kResidentRows + kStreamedRows) * ld +
         sizeof(float) * (kResidentRows * kLogitLd + kStreamedRows);
}

template <typename T>
struct Smem {
  T* resident;
  T* streamed;
  float* logits;
  float* column;
  int ld;
};

template <typename T>
__device__ __forceinline__ Smem<T> carve_smem(unsigned char* base, int head_dim) {
  static_assert(sizeof(T) == 2, "tensor-core path is 16-bit only");
  Smem<T> s;
  s.ld = head_dim + kRowPad;
  s.resident = reinterpret_cast<T*>(base);
  s.streamed = s.resident + kResidentRows * s.ld;
  s.logits = reinterpret_cast<float*>(s.streamed + kStreamedRows * s.ld);
  s.column = s.logits + kResidentRows * kLogitLd;
  return s;
}

// Copies `num_rows` rows of head_dim 16-bit elements into a tile of `tile_rows`
// rows with 16-byte vectors; rows >= num_rows are zero-filled.
template <typename T, typename RowPtr>
__device__ __forceinline__ void stage_rows(T* tile, int ld, int head_dim, int tile_rows,
                                           int num_rows, RowPtr row_ptr) {
  const int vecs_per_row = head_dim / 8;
  for (int idx = threadIdx.x; idx < tile_rows * vecs_per_row; idx += blockDim.x) {
    const int r = idx / vecs_per_row;
    const int v = idx - r * vecs_per_row;
    uint4 value = make_uint4(0u, 0u, 0u, 0u);
    if (r < num_rows) value = reinterpret_cast<const uint4*>(row_ptr(r))[v];
    reinterpret_cast<uint4*>(tile + r * ld)[v] = value;
  }
}

// logits[r][c] = resident[16 * warp + r] . streamed[c] for r < 16, c < 64: the
// warp's slice, written at logits + 16 * warp * kLogitLd.
template <typename T>
__device__ __forceinline__ void warp_logits(const Smem<T>& s, int head_dim, int warp) {
  using namespace nvcuda;
  constexpr int kColumnFrags = kStreamedRows / kFrag;
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kColumnFrags];
#pragma unroll
  for (int n = 0; n < kColumnFrags; ++n) wmma::fill_fragment(acc[n], 0.f);
  const T* a_base = s.resident + warp * kFrag * s.ld;
  for (int d0 = 0; d0 < head_dim; d0 += kFrag) {
    wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
    wmma::load_matrix_sync(a, a_base + d0, s.ld);
#pragma unroll
    for (int n = 0; n < kColumnFrags; ++n) {
      // B(k, n) = streamed[n][k]: the streamed tile read column-major.
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> b;
      wmma::load_matrix_sync(b, s.streamed + n * kFrag * s.ld + d0, s.ld);
      wmma::mma_sync(acc[n], a, b, acc[n]);
    }
  }
  float* out = s.logits + warp * kFrag * kLogitLd;
#pragma unroll
  for (int n = 0; n < kColumnFrags; ++n) {
    wmma::store_matrix_sync(out + n * kFrag, acc[n], kLogitLd, wmma::mem_row_major);
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Merges base-2 online-softmax states (max m, sum l) across the warp.
__device__ __forceinline__ void warp_merge_softmax(float& m, float& l) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float m_other = __shfl_xor_sync(0xffffffffu, m, offset);
    const float l_other = __shfl_xor_sync(0xffffffffu, l, offset);
    const float m_new = fmaxf(m, m_other);
    if (m_new != -INFINITY) l = l * exp2f(m - m_new) + l_other * exp2f(m_other - m_new);
    m = m_new;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_lse_mma_kernel(const ImportanceParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int head_dim = static_cast<int>(p.head_dim);
  const Smem<T> s = carve_smem<T>(smem_raw, head_dim);

  const int b = find_sequence_of_tile<kResidentRows>(p.query_start_loc, static_cast<int>(p.num_seqs),
                                                     blockIdx.x);
  if (b < 0) return;
  const int q_begin = p.query_start_loc[b];
  const int q_len = p.query_start_loc[b + 1] - q_begin;
  const int row0 = static_cast<int>(blockIdx.x - tile_base<kResidentRows>(p.query_start_loc, b)) *
                   kResidentRows;
  if (row0 >= q_len) return;  // spare tile of this sequence (uniform exit)
  const int num_rows = min(kResidentRows, q_len - row0);
  const int first_pos = p.seq_lens[b] - q_len;  // absolute position of query 0
  // The score pass reads no lse below min_query_pos (uniform exit, before any barrier).
  if (first_pos + row0 + num_rows <= p.min_query_pos[b]) return;
  const int h = blockIdx.y;
  const int g = h / static_cast<int>(p.num_q_heads / p.num_kv_heads);
  const T* query = static_cast<const T*>(p.query);
  const T* key_cache = static_cast<const T*>(p.key_cache);
  const int32_t* bt_row = p.block_table + static_cast<int64_t>(b) * p.bt_stride_row;

  stage_rows(s.resident, s.ld, head_dim, kResidentRows, num_rows, [&](int r) {
    const int64_t t = static_cast<int64_t>(q_begin) + row0 + r;
    return query + t * p.q_stride_token + static_cast<int64_t>(h) * p.q_stride_head;
  });

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const float scale2 = p.scale * kLog2e;
  const int warp_pos0 = first_pos + row0 + warp * kFrag;  // position of the warp's first row
  // Keys up to the tile's last query; this block walks its split of them.
  const KeyRange keys = split_keys(first_pos + row0 + num_rows, kStreamedRows, blockIdx.z,
                                   static_cast<int>(p.lse_splits));
  const float* my_logits = s.logits + warp * kFrag * kLogitLd;

  float m[kFrag];
  float l[kFrag];
#pragma unroll
  for (int r = 0; r < kFrag; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  for (int k0 = keys.begin; k0 < keys.end; k0 += kStreamedRows) {
    const int nk = min(kStreamedRows, keys.end - k0);
    __syncthreads();  // the query tile is staged / every warp is done with the last key tile
    stage_rows(s.streamed, s.ld, head_dim, kStreamedRows, nk,
               [&](int r) { return key_row(p, key_cache, bt_row, k0 + r, g); });
    __syncthreads();
    warp_logits(s, head_dim, warp);
    __syncwarp();
    const int key0 = k0 + lane;
    const int key1 = key0 + kWarpSize;
#pragma unroll
    for (int r = 0; r < kFrag; ++r) {
      const int pos = warp_pos0 + r;
      const float x0 = (lane < nk && key0 <= pos) ? my_logits[r * kLogitLd + lane] * scale2 : -INFINITY;
      const float x1 = (lane + kWarpSize < nk && key1 <= pos)
                           ? my_logits[r * kLogitLd + lane + kWarpSize] * scale2
                           : -INFINITY;
      const float m_new = fmaxf(m[r], fmaxf(x0, x1));
      if (m_new != -INFINITY) {
        l[r] = l[r] * exp2f(m[r] - m_new) + exp2f(x0 - m_new) + exp2f(x1 - m_new);
        m[r] = m_new;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kFrag; ++r) {
    warp_merge_softmax(m[r], l[r]);
    const int row = warp * kFrag + r;
    if (lane == 0 && row < num_rows) {  // l is a sum of exp2(x2 - m2) = exp(x - m2 * ln 2)
      store_lse_state(p, h, static_cast<int64_t>(q_begin) + row0 + row, blockIdx.z, m[r] * kLn2, l[r]);
    }
  }
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreads) importance_scores_mma_kernel(const ImportanceParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int head_dim = static_cast<int>(p.head_dim);
  const Smem<T> s = carve_smem<T>(smem_raw, head_dim);
  float* s_lse2 = s.column;  // lse * log2 e of the streamed queries; +inf = not scored

  const int g = blockIdx.y;
  const int b = blockIdx.z;
  const ScoredSequence seq = scored_sequence(p, b);
  if (seq.q_len <= 0) return;
  const int q_begin = seq.q_begin, q_len = seq.q_len, num_keys = seq.num_keys;
  const int first_pos = seq.first_pos, min_pos = seq.min_pos, group = seq.group;
  const float scale2 = p.scale * kLog2e;
  const T* query = static_cast<const T*>(p.query);
  const T* key_cache = static_cast<const T*>(p.key_cache);
  const int32_t* bt_row = p.block_table + static_cast<int64_t>(b) * p.bt_stride_row;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const float* my_logits = s.logits + warp * kFrag * kLogitLd;

  const int num_key_tiles = (num_keys + kResidentRows - 1) / kResidentRows;
  for (int kt = blockIdx.x; kt < num_key_tiles; kt += gridDim.x) {
    const int k0 = kt * kResidentRows;
    const int nk = min(kResidentRows, num_keys - k0);
    // First scored query that sees some key of the tile (causal, >= min_pos).
    const int i_begin = max(0, max(k0, min_pos) - first_pos);
    if (i_begin >= q_len) continue;  // block-uniform

    __syncthreads();  // the previous key tile's readers are done
    stage_rows(s.resident, s.ld, head_dim, kResidentRows, nk,
               [&](int r) { return key_row(p, key_cache, bt_row, k0 + r, g); });
    const int warp_key0 = k0 + warp * kFrag;
    float acc[kFrag];
#pragma unroll
    for (int r = 0; r < kFrag; ++r) acc[r] = 0.f;

    for (int hh = 0; hh < group; ++hh) {
      const int h = g * group + hh;
      for (int i0 = i_begin; i0 < q_len; i0 += kStreamedRows) {
        const int nq = min(kStreamedRows, q_len - i0);
        __syncthreads();  // keys are staged / every warp is done with the last query tile
        stage_rows(s.streamed, s.ld, head_dim, kStreamedRows, nq, [&](int r) {
          const int64_t t = static_cast<int64_t>(q_begin) + i0 + r;
          return query + t * p.q_stride_token + static_cast<int64_t>(h) * p.q_stride_head;
        });
        if (tid < kStreamedRows) {
          float lse2 = INFINITY;
          if (tid < nq && first_pos + i0 + tid >= min_pos) {
            const int64_t t = static_cast<int64_t>(q_begin) + i0 + tid;
            lse2 = p.lse[static_cast<int64_t>(h) * p.lse_stride_head + t * p.lse_stride_token] * kLog2e;
          }
          s_lse2[tid] = lse2;
        }
        __syncthreads();
        warp_logits(s, head_dim, warp);
        __syncwarp();
        const float lse0 = s_lse2[lane];
        const float lse1 = s_lse2[lane + kWarpSize];
        const int pos0 = first_pos + i0 + lane;
        const int pos1 = pos0 + kWarpSize;
#pragma unroll
        for (int r = 0; r < kFrag; ++r) {
          const int key = warp_key0 + r;
          const float* row = my_logits + r * kLogitLd;
          float sum = 0.f;
          if (key <= pos0) sum += exp2f(row[lane] * scale2 - lse0);
          if (key <= pos1) sum += exp2f(row[lane + kWarpSize] * scale2 - lse1);
          acc[r] += sum;
        }
      }
    }
    float mine = 0.f;
#pragma unroll
    for (int r = 0; r < kFrag; ++r) {
      const float total = warp_sum(acc[r]);
      if (lane == r) mine = total;
    }
    if (lane < kFrag && warp * kFrag + lane < nk) {
      float* out = p.scores + static_cast<int64_t>(b) * p.sc_stride_seq +
                   static_cast<int64_t>(g) * p.sc_stride_head +
                   static_cast<int64_t>(warp_key0 + lane) * p.sc_stride_key;
      *out += mine / static_cast<float>(group);
    }
  }
#endif
}

template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= kDefaultSmemBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <typename T>
cudaError_t launch_lse_typed(const ImportanceParams& p, cudaStream_t stream) {
  const int64_t grid_x = num_query_tile_slots<kResidentRows>(p.num_tokens, p.num_seqs);
  if (grid_x <= 0) return cudaSuccess;
  if (grid_x > 0x7fffffff) return cudaErrorInvalidValue;
  const size_t smem = smem_bytes(p.head_dim);
  const cudaError_t err = allow_dynamic_smem(attention_lse_mma_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(p.num_q_heads),
                  static_cast<unsigned>(p.lse_splits));
  attention_lse_mma_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  return launch_lse_combine<kResidentRows>(p, grid_x, stream);
}

template <typename T>
cudaError_t launch_scores_typed(const ImportanceParams& p, int num_sms, cudaStream_t stream) {
  const int64_t max_key_tiles = (p.max_keys + kResidentRows - 1) / kResidentRows;
  const int64_t pairs = p.num_seqs * p.num_kv_heads;
  if (max_key_tiles <= 0 || pairs <= 0) return cudaSuccess;
  if (p.num_kv_heads > 65535 || p.num_seqs > 65535) return cudaErrorInvalidValue;
  // Enough blocks to fill the device a few times over; key tiles are walked with
  // a grid stride, so the host needs no sequence lengths.
  const int64_t target_blocks = static_cast<int64_t>(num_sms) * 8;
  int64_t grid_x = (target_blocks + pairs - 1) / pairs;
  if (grid_x > max_key_tiles) grid_x = max_key_tiles;
  if (grid_x < 1) grid_x = 1;
  const size_t smem = smem_bytes(p.head_dim);
  const cudaError_t err = allow_dynamic_smem(importance_scores_mma_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(p.num_seqs));
  importance_scores_mma_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

bool multiple_of(int64_t value, int64_t m) { return value % m == 0; }

}  // namespace

bool mma_importance_supported(const ImportanceParams& p) {
  if (p.query_kind != p.key_kind || p.query_kind == ScalarKind::kFloat32) return false;
  if (p.head_dim <= 0 || p.head_dim % kFrag != 0 || p.head_dim > kMaxHeadDim) return false;
  // Whole rows move as 16-byte vectors: 8 elements of 2 bytes.
  const auto address = [](const void* ptr) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr)); };
  if (!multiple_of(address(p.query), 16) || !multiple_of(address(p.key_cache), 16)) return false;
  for (const int64_t stride : {p.q_stride_token, p.q_stride_head, p.k_stride_block,
                               p.k_stride_slot, p.k_stride_head}) {
    if (!multiple_of(stride, 8)) return false;
  }
  int device = 0;
  int major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  return major >= 8;  // bfloat16 WMMA
}

cudaError_t launch_attention_lse_mma(const ImportanceParams& p, cudaStream_t stream) {
  if (p.query_kind == ScalarKind::kBFloat16) return launch_lse_typed<__nv_bfloat16>(p, stream);
  return launch_lse_typed<__half>(p, stream);
}

cudaError_t launch_importance_scores_mma(const ImportanceParams& p, int num_sms,
                                         cudaStream_t stream) {
  if (p.query_kind == ScalarKind::kBFloat16) {
    return launch_scores_typed<__nv_bfloat16>(p, num_sms, stream);
  }
  return launch_scores_typed<__half>(p, num_sms, stream);
}

}  // namespace cuda
}  // namespace prefixkv

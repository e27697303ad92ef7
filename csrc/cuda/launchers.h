// Plain C++ interface between the torch bindings (torch_bindings_cuda.cpp) and
// the CUDA kernels (importance.cu, compact.cu). No torch headers here, so the
// .cu files build with plain nvcc.
//
// Semantics are defined by prefixkv_vllm/ops/reference.py. Paged caches are
// 4-D views [num_blocks, block_size, num_kv_heads, head_dim] with arbitrary
// strides except that head_dim is contiguous; token t of a sequence lives at
// cache[block_table[b, t / block_size], t % block_size]. All strides are in
// elements of the tensor they describe, as torch reports them.
//
// The launchers only enqueue work on `stream`; they return the CUDA error of
// the launch (cudaSuccess when nothing needed launching). They trust the
// device-side contents (query_start_loc, seq_lens, block_table, keep_indices)
// to satisfy the contract that the shared validators and the reference state.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace prefixkv {
namespace cuda {

// Floating-point element types the importance kernels read (fp8: keys only,
// stored as key / k_scale; the caller folds k_scale into `scale`).
enum class ScalarKind : int {
  kFloat32 = 0,
  kFloat16 = 1,     // __half
  kBFloat16 = 2,    // __nv_bfloat16
  kFloat8E4M3 = 3,  // __nv_fp8_e4m3
  kFloat8E5M2 = 4,  // __nv_fp8_e5m2
};

struct ImportanceParams {
  // query [T, Hq, D]; element (t, h, d) at t*q_stride_token + h*q_stride_head + d.
  const void* query = nullptr;
  ScalarKind query_kind = ScalarKind::kFloat32;
  int64_t q_stride_token = 0;
  int64_t q_stride_head = 0;

  // key cache view [num_blocks, block_size, Hkv, D].
  const void* key_cache = nullptr;
  ScalarKind key_kind = ScalarKind::kFloat32;
  int64_t k_stride_block = 0;
  int64_t k_stride_slot = 0;
  int64_t k_stride_head = 0;

  // block_table [B, max_blocks] int32.
  const int32_t* block_table = nullptr;
  int64_t bt_stride_row = 0;
  int64_t bt_stride_col = 0;

  // Contiguous int32 vectors: query_start_loc [B + 1], seq_lens [B],
  // min_query_pos [B].
  const int32_t* query_start_loc = nullptr;
  const int32_t* seq_lens = nullptr;
  const int32_t* min_query_pos = nullptr;

  // scores [B, Hkv, max_keys] float32, accumulated into (+=).
  float* scores = nullptr;
  int64_t sc_stride_seq = 0;
  int64_t sc_stride_head = 0;
  int64_t sc_stride_key = 0;

  // lse [Hq, T] float32: read by launch_importance_scores, written by
  // launch_attention_lse.
  float* lse = nullptr;
  int64_t lse_stride_head = 0;
  int64_t lse_stride_token = 0;

  // Key splits of the lse pass (lse_split.cuh): with lse_splits > 1,
  // launch_attention_lse writes partial states to lse_partials (2 * lse_splits *
  // Hq * T floats, scratch) and merges them into lse. attention_lse_splits picks it.
  float* lse_partials = nullptr;
  int64_t lse_splits = 1;

  int64_t num_tokens = 0;    // T (query.size(0)); may exceed query_start_loc[B]
  int64_t num_seqs = 0;      // B
  int64_t num_q_heads = 0;   // Hq (a multiple of Hkv)
  int64_t num_kv_heads = 0;  // Hkv
  int64_t head_dim = 0;      // D
  int64_t block_size = 0;
  int64_t max_keys = 0;      // scores.size(2); keys j >= max_keys are never written
  float scale = 1.0f;
};

// Pass 1: lse[h, t] = causal row log-sum-exp of scale * q_t,h . k_j over keys
// j <= position(t). Tokens t >= query_start_loc[B] (padding) are not written, nor
// are the query tiles wholly below min_query_pos (the score pass reads none).
cudaError_t launch_attention_lse(const ImportanceParams& p, cudaStream_t stream);

// Key splits for pass 1 on the current device (1 when its query tiles alone fill
// the SMs): a scored window of a few queries over a long prompt gets many.
int64_t attention_lse_splits(const ImportanceParams& p);

// Pass 2: scores[b, g, j] += sum over scored queries i of
// mean_{h in group g} exp(scale * q_i,h . k_j - lse[h, i]) (causal, position(i)
// >= min_query_pos[b]). Deterministic: each (b, g, j) is owned by one thread.
cudaError_t launch_importance_scores(const ImportanceParams& p,
                                     cudaStream_t stream);

// Tensor-core variants (importance_mma.cu), which the two launchers above pick
// when this holds: float16 or bfloat16 query and keys of one type, head_dim a
// multiple of 16 up to 256, 16-byte aligned rows, compute capability >= 8.0.
bool mma_importance_supported(const ImportanceParams& p);
cudaError_t launch_attention_lse_mma(const ImportanceParams& p, cudaStream_t stream);
cudaError_t launch_importance_scores_mma(const ImportanceParams& p, int num_sms,
                                         cudaStream_t stream);

// One call moves a whole step: items are (request, layer) pairs. Every layer's
// caches share one layout (strides, element size), so only the base pointers
// differ; they travel in the kernel arguments (no device table to upload, so the
// launch stays free of host-device copies). 2 * 128 pointers keep the arguments
// within the classic 4 KB limit.
constexpr int kMaxCompactLayers = 128;

struct CompactCacheLayout {
  // Strides in elements; element_size in bytes. Caches are moved byte-wise, so any
  // element type works (including fp8).
  int64_t element_size = 0;
  int64_t stride_block = 0;
  int64_t stride_slot = 0;
  int64_t stride_head = 0;
  int64_t head_dim = 0;
};

struct CompactParams {
  void* key_caches[kMaxCompactLayers] = {};
  void* value_caches[kMaxCompactLayers] = {};
  int64_t num_layers = 0;  // L; items whose layer is outside [0, L) are skipped
  CompactCacheLayout keys;
  CompactCacheLayout values;

  // layers [I] int32, contiguous: the layer of each item.
  const int32_t* layers = nullptr;

  // block_table [I, max_blocks] int32.
  const int32_t* block_table = nullptr;
  int64_t bt_stride_row = 0;
  int64_t bt_stride_col = 0;

  // keep_indices [I, Hs, K] int32 with Hs == 1 (shared) or Hs == Hkv.
  const int32_t* keep_indices = nullptr;
  int64_t ki_stride_req = 0;
  int64_t ki_stride_head = 0;
  int64_t ki_stride_pos = 0;

  // num_kept [I] int32, contiguous. Values are clamped to [0, K] on device.
  const int32_t* num_kept = nullptr;

  int64_t num_items = 0;        // I
  int64_t num_kv_heads = 0;     // Hkv
  int64_t num_keep_heads = 0;   // Hs
  int64_t max_keep = 0;         // K
  int64_t block_size = 0;
  int64_t max_blocks = 0;       // block_table.size(1)
  int64_t num_blocks = 0;       // caches' size(0); block ids outside [0, num_blocks) are skipped
};

// For every item i and KV head g: token slot t < num_kept[i] of head g receives
// what slot keep_indices[i, Hs == 1 ? 0 : g, t] held before, for keys and values
// of layer layers[i], in place. Two kernels in stream order; overlap-safe (see
// compact.cu).
cudaError_t launch_compact(const CompactParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace prefixkv

// Registers the CUDA kernels of the prefixkv ops (schemas: torch_bindings.cpp,
// semantics: prefixkv_vllm/ops/reference.py). Built only against a CUDA torch.
//
// Neither op reads device memory on the host, so both are free of host
// synchronisation and may be captured in a CUDA graph (the lse workspace comes
// from the caching allocator). The flip side: unlike the CPU backend, the
// contents of the index tensors (query_start_loc order, seq_lens vs. q_len,
// max_keys and block_table width, block ids, keep_indices order and range,
// num_kept) are not validated here; the kernels trust them. They only guard
// their writes: importance never writes scores at j >= max_keys, compact clamps
// num_kept to K and skips items whose layer, and tokens whose position or block
// id, is out of range.
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "launchers.h"

namespace prefixkv {
namespace {

cuda::ScalarKind scalar_kind(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::ScalarKind::kFloat32;
    case at::kHalf:
      return cuda::ScalarKind::kFloat16;
    case at::kBFloat16:
      return cuda::ScalarKind::kBFloat16;
    case at::kFloat8_e4m3fn:
      return cuda::ScalarKind::kFloat8E4M3;
    case at::kFloat8_e5m2:
      return cuda::ScalarKind::kFloat8E5M2;
    default:
      TORCH_CHECK(false, op, ": the CUDA kernel does not support ", name, " of dtype ",
                  t.scalar_type(), " (float32, float16, bfloat16 and, for keys, fp8 are supported)");
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The CUDA kernels copy head_dim rows with vector loads, as laid out by
// FlashAttention's cache; the CPU kernels also take strided and tiled views.
void check_contiguous_head_dim(const at::Tensor& cache, const char* op, const char* name) {
  TORCH_CHECK(cache.dim() == 4, op, ": ", name,
              " must be a [num_blocks, block_size, Hkv, D] view on CUDA (tiled views are CPU cache layouts), "
              "got shape ", cache.sizes());
  TORCH_CHECK(cache.size(3) <= 1 || cache.stride(3) == 1, op, ": ", name,
              " head_dim must be contiguous on CUDA (stride(3) == 1), got strides ", cache.strides());
}

void importance_cuda(const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& block_table, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, const at::Tensor& min_query_pos,
                     double scale, at::Tensor& scores, const std::optional<at::Tensor>& lse) {
  constexpr const char* kOp = "prefixkv.importance";
  check_importance_args(query, key_cache, block_table, query_start_loc, seq_lens,
                        min_query_pos, scores, lse);

  // check_importance_args has checked devices, dims, dtypes (query and
  // key_cache share one of float32 / float16 / bfloat16) and shapes; the
  // dispatcher only routes CUDA tensors here.
  check_contiguous_head_dim(key_cache, kOp, "key_cache");
  const at::Device device = query.device();
  TORCH_INTERNAL_ASSERT(device.is_cuda());
  const int64_t num_seqs = seq_lens.numel();

  const c10::cuda::CUDAGuard guard(device);
  // Same stream as at::cuda::getCurrentCUDAStream() (which forwards here).
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  const int64_t num_tokens = query.size(0);
  const int64_t num_q_heads = query.size(1);

  at::Tensor lse_buf;
  bool compute_lse = false;
  if (lse.has_value()) {
    lse_buf = *lse;
  } else {
    lse_buf = at::empty({num_q_heads, num_tokens}, query.options().dtype(at::kFloat));
    compute_lse = true;
  }
  if (num_tokens == 0 || num_seqs == 0) return;

  // 1-D vectors: the kernels index them densely (no-op when already contiguous).
  const at::Tensor qsl = query_start_loc.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const at::Tensor min_pos = min_query_pos.contiguous();

  cuda::ImportanceParams p;
  p.query = query.data_ptr();
  p.query_kind = scalar_kind(query, kOp, "query");
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.key_cache = key_cache.data_ptr();
  p.key_kind = scalar_kind(key_cache, kOp, "key_cache");
  p.k_stride_block = key_cache.stride(0);
  p.k_stride_slot = key_cache.stride(1);
  p.k_stride_head = key_cache.stride(2);
  p.block_table = block_table.data_ptr<int32_t>();
  p.bt_stride_row = block_table.stride(0);
  p.bt_stride_col = block_table.stride(1);
  p.query_start_loc = qsl.data_ptr<int32_t>();
  p.seq_lens = lens.data_ptr<int32_t>();
  p.min_query_pos = min_pos.data_ptr<int32_t>();
  p.scores = scores.data_ptr<float>();
  p.sc_stride_seq = scores.stride(0);
  p.sc_stride_head = scores.stride(1);
  p.sc_stride_key = scores.stride(2);
  p.lse = lse_buf.data_ptr<float>();
  p.lse_stride_head = lse_buf.stride(0);
  p.lse_stride_token = lse_buf.stride(1);
  p.num_tokens = num_tokens;
  p.num_seqs = num_seqs;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = key_cache.size(2);
  p.head_dim = query.size(2);
  p.block_size = key_cache.size(1);
  p.max_keys = scores.size(2);
  p.scale = static_cast<float>(scale);

  at::Tensor lse_partials;  // kept alive until the launches are enqueued (caching allocator)
  if (compute_lse) {
    p.lse_splits = cuda::attention_lse_splits(p);
    if (p.lse_splits > 1) {
      lse_partials = at::empty({2, p.lse_splits, num_q_heads, num_tokens}, query.options().dtype(at::kFloat));
      p.lse_partials = lse_partials.data_ptr<float>();
    }
    check_launch(cuda::launch_attention_lse(p, stream), kOp);
  }
  check_launch(cuda::launch_importance_scores(p, stream), kOp);
}

cuda::CompactCacheLayout compact_layout(const at::Tensor& cache) {
  cuda::CompactCacheLayout c;
  c.element_size = cache.element_size();
  c.stride_block = cache.stride(0);
  c.stride_slot = cache.stride(1);
  c.stride_head = cache.stride(2);
  c.head_dim = cache.size(3);
  return c;
}

void compact_cuda(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& layers,
                  const at::Tensor& block_table, const at::Tensor& keep_indices,
                  const at::Tensor& num_kept) {
  constexpr const char* kOp = "prefixkv.compact";
  check_compact_args(key_caches, value_caches, layers, block_table, keep_indices, num_kept);

  // check_compact_args has checked devices, dims, dtypes, that every layer shares
  // the first one's layout, matching key/value shapes and the I / Hs sizes.
  check_contiguous_head_dim(key_caches[0], kOp, "key_caches");
  check_contiguous_head_dim(value_caches[0], kOp, "value_caches");
  const int64_t num_layers = static_cast<int64_t>(key_caches.size());
  TORCH_CHECK(num_layers <= cuda::kMaxCompactLayers, kOp, ": at most ", cuda::kMaxCompactLayers,
              " layers per call on CUDA, got ", num_layers);
  const at::Device device = key_caches[0].device();
  TORCH_INTERNAL_ASSERT(device.is_cuda());

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  const at::Tensor layer_ids = layers.contiguous();
  const at::Tensor kept = num_kept.contiguous();

  cuda::CompactParams p;
  for (int64_t l = 0; l < num_layers; ++l) {
    p.key_caches[l] = key_caches[l].data_ptr();
    p.value_caches[l] = value_caches[l].data_ptr();
  }
  p.num_layers = num_layers;
  p.keys = compact_layout(key_caches[0]);
  p.values = compact_layout(value_caches[0]);
  p.layers = layer_ids.data_ptr<int32_t>();
  p.block_table = block_table.data_ptr<int32_t>();
  p.bt_stride_row = block_table.stride(0);
  p.bt_stride_col = block_table.stride(1);
  p.keep_indices = keep_indices.data_ptr<int32_t>();
  p.ki_stride_req = keep_indices.stride(0);
  p.ki_stride_head = keep_indices.stride(1);
  p.ki_stride_pos = keep_indices.stride(2);
  p.num_kept = kept.data_ptr<int32_t>();
  p.num_items = num_kept.numel();
  p.num_kv_heads = key_caches[0].size(2);
  p.num_keep_heads = keep_indices.size(1);
  p.max_keep = keep_indices.size(2);
  p.block_size = key_caches[0].size(1);
  p.max_blocks = block_table.size(1);
  p.num_blocks = key_caches[0].size(0);

  check_launch(cuda::launch_compact(p, stream), kOp);
}

}  // namespace
}  // namespace prefixkv

TORCH_LIBRARY_IMPL(prefixkv, CUDA, m) {
  m.impl("importance", &prefixkv::importance_cuda);
  m.impl("compact", &prefixkv::compact_cuda);
}

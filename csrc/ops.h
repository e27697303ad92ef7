// Host entry points of the prefixkv ops. The schemas live in torch_bindings.cpp;
// the semantics are defined by prefixkv_vllm/ops/reference.py.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace prefixkv {

// Paged cache views come in two forms (prefixkv_vllm/ops/reference.py):
// [num_blocks, block_size, Hkv, D], or tiled [num_blocks, block_size / slot_tile,
// slot_tile, Hkv, D / dim_tile, dim_tile]. `tiled_view` returns the 6-D form of
// either (no copy); the sizes below read either form.
at::Tensor tiled_view(const at::Tensor& cache);
int64_t paged_block_size(const at::Tensor& cache);
int64_t paged_num_kv_heads(const at::Tensor& cache);
int64_t paged_head_dim(const at::Tensor& cache);

// Validates the arguments shared by every backend's `importance`, so CPU and
// CUDA reject the same inputs with the same messages.
void check_importance_args(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& block_table,
                           const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens,
                           const at::Tensor& min_query_pos,
                           const at::Tensor& scores,
                           const std::optional<at::Tensor>& lse);

// compact moves one step's items (a request in a layer) across every layer at once:
// item i lives in layer layers[i], i.e. in key_caches[layers[i]] and
// value_caches[layers[i]]. All key caches share one shape, dtype and strides (one
// description serves every layer), and so do all value caches.
void check_compact_args(at::TensorList key_caches, at::TensorList value_caches,
                        const at::Tensor& layers, const at::Tensor& block_table,
                        const at::Tensor& keep_indices, const at::Tensor& num_kept);

void importance_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                    const at::Tensor& block_table,
                    const at::Tensor& query_start_loc,
                    const at::Tensor& seq_lens,
                    const at::Tensor& min_query_pos, double scale,
                    at::Tensor& scores, const std::optional<at::Tensor>& lse);

void compact_cpu(at::TensorList key_caches, at::TensorList value_caches,
                 const at::Tensor& layers, const at::Tensor& block_table,
                 const at::Tensor& keep_indices, const at::Tensor& num_kept);

}  // namespace prefixkv

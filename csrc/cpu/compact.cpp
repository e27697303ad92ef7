// CPU kernel of prefixkv::compact (semantics: prefixkv_vllm/ops/reference.py).
//
// One call moves a whole step: items are (request, layer) pairs, each naming its
// layer's caches. Every index is validated before anything is written, so a
// rejected call leaves every cache untouched. The copy then runs in parallel over
// (item, kv head): each pair owns its head's slots in the item's blocks of its
// layer. Elements are copied as raw bytes (element size from the dtype), so any
// cache dtype works, fp8/uint8 included, in either paged form (ops.h): a slot's
// elements are found through per-slot and per-dim byte offsets, which are the
// same for every layer (check_compact_args: one layout per call).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

namespace prefixkv {
namespace {

constexpr const char* kOp = "prefixkv::compact";

struct Items {
  const int32_t* layers;
  const int32_t* block_table;
  const int32_t* keep;
  const int32_t* kept;
  int64_t count, max_blocks, index_sets, max_kept;  // index_sets: 1 (shared) or Hkv
};

// Checks every index of item i: its layer, counts, kept positions and the blocks they reach.
void validate_item(const Items& it, int64_t i, int64_t num_layers, int64_t block_size,
                   int64_t num_blocks) {
  const int64_t layer = it.layers[i];
  TORCH_CHECK(0 <= layer && layer < num_layers, kOp, ": layers[", i, "] = ", layer,
              " is out of range [0, ", num_layers, ")");
  const int64_t count = it.kept[i];
  TORCH_CHECK(0 <= count && count <= it.max_kept, kOp, ": num_kept[", i, "] = ", count,
              " must be in [0, keep_indices.shape[2] = ", it.max_kept, "]");
  if (count == 0) return;
  const int64_t capacity = it.max_blocks * block_size;
  int64_t highest = count - 1;  // destination slots 0..count-1
  for (int64_t s = 0; s < it.index_sets; ++s) {
    const int32_t* idx = it.keep + (i * it.index_sets + s) * it.max_kept;
    for (int64_t t = 0; t < count; ++t) {
      const int64_t v = idx[t];
      TORCH_CHECK(0 <= v && v < capacity, kOp, ": keep_indices[", i, ", ", s, ", ", t, "] = ", v,
                  " is out of range [0, ", capacity, ") (block_table.shape[1] * block_size)");
      TORCH_CHECK(t == 0 || v > idx[t - 1], kOp, ": keep_indices[", i, ", ", s,
                  ", :num_kept] must be strictly increasing, but entry ", t, " = ", v,
                  " follows ", idx[t - 1]);
    }
    highest = std::max<int64_t>(highest, idx[count - 1]);
  }
  for (int64_t k = 0; k <= highest / block_size; ++k) {
    const int64_t id = it.block_table[i * it.max_blocks + k];
    TORCH_CHECK(0 <= id && id < num_blocks, kOp, ": block_table[", i, ", ", k, "] = ", id,
                " is out of range [0, ", num_blocks, ")");
  }
}

// One cache layout (shared by every layer) as byte offsets, and each layer's base.
struct Layout {
  std::vector<char*> bases;
  int64_t block_stride, head_stride;
  std::vector<int64_t> slot_offsets, dim_offsets;
  bool contiguous_dims;  // a slot's head_dim is one run of bytes
};

Layout describe(at::TensorList caches) {
  const at::Tensor c = tiled_view(caches[0]);
  const int64_t element_size = static_cast<int64_t>(caches[0].element_size());
  auto offsets = [&](int64_t hi, int64_t lo, int64_t count) {
    std::vector<int64_t> out(count);
    for (int64_t i = 0; i < count; ++i) {
      out[i] = ((i / c.size(lo)) * c.stride(hi) + (i % c.size(lo)) * c.stride(lo)) * element_size;
    }
    return out;
  };
  Layout result{{}, c.stride(0) * element_size, c.stride(3) * element_size,
                offsets(1, 2, paged_block_size(caches[0])), offsets(4, 5, paged_head_dim(caches[0])),
                true};
  for (const at::Tensor& cache : caches) result.bases.push_back(static_cast<char*>(cache.data_ptr()));
  for (size_t d = 0; d < result.dim_offsets.size(); ++d) {
    result.contiguous_dims = result.contiguous_dims && result.dim_offsets[d] == static_cast<int64_t>(d) * element_size;
  }
  return result;
}

// Moves head g of item i, in order. In-order is overlap-safe: idx is strictly
// increasing with idx[t] >= t, so slot idx[t] is never a destination t' < t
// already written, nor read again.
void move_head(const Items& it, const Layout (&layouts)[2], int64_t i, int64_t g,
               int64_t block_size, int64_t element_size) {
  const int64_t count = it.kept[i];
  const int64_t layer = it.layers[i];
  const int32_t* idx = it.keep + (i * it.index_sets + (it.index_sets == 1 ? 0 : g)) * it.max_kept;
  const int32_t* blocks = it.block_table + i * it.max_blocks;
  const int64_t head_dim = static_cast<int64_t>(layouts[0].dim_offsets.size());
  for (int64_t t = 0; t < count; ++t) {
    const int64_t src = idx[t];
    if (src == t) continue;
    const int64_t sb = blocks[src / block_size], ss = src % block_size;
    const int64_t db = blocks[t / block_size], ds = t % block_size;
    for (const Layout& c : layouts) {
      char* base = c.bases[layer] + g * c.head_stride;
      char* dst_ptr = base + db * c.block_stride + c.slot_offsets[ds];
      const char* src_ptr = base + sb * c.block_stride + c.slot_offsets[ss];
      if (c.contiguous_dims) {
        std::memmove(dst_ptr, src_ptr, static_cast<size_t>(head_dim * element_size));
      } else {  // vLLM's CPU caches store keys transposed, and AMX tiles them
        for (int64_t d = 0; d < head_dim; ++d) {
          std::memcpy(dst_ptr + c.dim_offsets[d], src_ptr + c.dim_offsets[d], element_size);
        }
      }
    }
  }
}

}  // namespace

void compact_cpu(at::TensorList key_caches, at::TensorList value_caches,
                 const at::Tensor& layers, const at::Tensor& block_table,
                 const at::Tensor& keep_indices, const at::Tensor& num_kept) {
  check_compact_args(key_caches, value_caches, layers, block_table, keep_indices, num_kept);
  TORCH_CHECK(key_caches[0].device().is_cpu(), kOp, ": compact_cpu got a ",
              key_caches[0].device(), " tensor");

  const at::Tensor layer_ids = layers.contiguous();
  const at::Tensor bt = block_table.contiguous();
  const at::Tensor keep = keep_indices.contiguous();
  const at::Tensor kept = num_kept.contiguous();
  const Items it{layer_ids.data_ptr<int32_t>(), bt.data_ptr<int32_t>(), keep.data_ptr<int32_t>(),
                 kept.data_ptr<int32_t>(),      kept.size(0),         bt.size(1),
                 keep.size(1),                  keep.size(2)};
  const int64_t block_size = paged_block_size(key_caches[0]);
  const int64_t num_layers = static_cast<int64_t>(key_caches.size());
  for (int64_t i = 0; i < it.count; ++i) {  // everything, before any write
    validate_item(it, i, num_layers, block_size, key_caches[0].size(0));
  }
  const int64_t num_kv_heads = paged_num_kv_heads(key_caches[0]);
  if (paged_head_dim(key_caches[0]) == 0 || num_kv_heads == 0) return;

  const Layout layouts[2] = {describe(key_caches), describe(value_caches)};
  const int64_t element_size = static_cast<int64_t>(key_caches[0].element_size());
  const int64_t num_work = it.count * num_kv_heads;
  const int nthreads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t w = 0; w < num_work; ++w) {
    move_head(it, layouts, w / num_kv_heads, w % num_kv_heads, block_size, element_size);
  }
}

}  // namespace prefixkv

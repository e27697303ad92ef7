// CPU kernel of prefixkv::compact (semantics: prefixkv_vllm/ops/reference.py).
//
// Every index is validated before anything is written, so a rejected call
// leaves both caches untouched. The copy then runs in parallel over
// (request, kv head): each pair owns its head's slots in the request's blocks.
// Elements are copied as raw bytes (element size from the dtype), so any cache
// dtype works, fp8/uint8 included, in either paged form (ops.h): a slot's
// elements are found through per-slot and per-dim byte offsets.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

namespace prefixkv {

void compact_cpu(at::Tensor& key_cache, at::Tensor& value_cache,
                 const at::Tensor& block_table, const at::Tensor& keep_indices,
                 const at::Tensor& num_kept) {
  check_compact_args(key_cache, value_cache, block_table, keep_indices, num_kept);
  constexpr const char* op = "prefixkv::compact";
  TORCH_CHECK(key_cache.device().is_cpu(), op, ": compact_cpu got a ",
              key_cache.device(), " tensor");

  const int64_t num_requests = num_kept.size(0);
  const int64_t num_blocks = key_cache.size(0);
  const int64_t block_size = paged_block_size(key_cache);
  const int64_t num_kv_heads = paged_num_kv_heads(key_cache);
  const int64_t head_dim = paged_head_dim(key_cache);
  const at::Tensor bt = block_table.contiguous();
  const at::Tensor keep = keep_indices.contiguous();
  const at::Tensor kept = num_kept.contiguous();
  const int32_t* bt_data = bt.data_ptr<int32_t>();
  const int32_t* keep_data = keep.data_ptr<int32_t>();
  const int32_t* kept_data = kept.data_ptr<int32_t>();
  const int64_t max_blocks = bt.size(1);
  const int64_t index_sets = keep.size(1);  // 1 (shared) or Hkv
  const int64_t max_kept = keep.size(2);
  const int64_t capacity = max_blocks * block_size;

  // Validate everything up front, before any write.
  for (int64_t r = 0; r < num_requests; ++r) {
    const int64_t count = kept_data[r];
    TORCH_CHECK(0 <= count && count <= max_kept, op, ": num_kept[", r, "] = ", count,
                " must be in [0, keep_indices.shape[2] = ", max_kept, "]");
    if (count == 0) continue;
    int64_t highest = count - 1;  // destination slots 0..count-1
    for (int64_t s = 0; s < index_sets; ++s) {
      const int32_t* idx = keep_data + (r * index_sets + s) * max_kept;
      for (int64_t t = 0; t < count; ++t) {
        const int64_t v = idx[t];
        TORCH_CHECK(0 <= v && v < capacity, op, ": keep_indices[", r, ", ", s, ", ",
                    t, "] = ", v, " is out of range [0, ", capacity,
                    ") (block_table.shape[1] * block_size)");
        TORCH_CHECK(t == 0 || v > idx[t - 1], op, ": keep_indices[", r, ", ", s,
                    ", :num_kept] must be strictly increasing, but entry ", t,
                    " = ", v, " follows ", idx[t - 1]);
      }
      highest = std::max<int64_t>(highest, idx[count - 1]);
    }
    for (int64_t k = 0; k <= highest / block_size; ++k) {
      const int64_t id = bt_data[r * max_blocks + k];
      TORCH_CHECK(0 <= id && id < num_blocks, op, ": block_table[", r, ", ", k,
                  "] = ", id, " is out of range [0, ", num_blocks, ")");
    }
  }
  if (head_dim == 0 || num_kv_heads == 0) return;

  const int64_t element_size = static_cast<int64_t>(key_cache.element_size());
  // Byte offsets of every slot in a block and every dim in a slot, from the tiled view.
  struct Cache {
    char* data;
    int64_t block_stride, head_stride;
    std::vector<int64_t> slot_offsets, dim_offsets;
    bool contiguous_dims;  // a slot's head_dim is one run of bytes
  };
  auto describe = [&](at::Tensor& cache) {
    const at::Tensor c = tiled_view(cache);
    auto offsets = [&](int64_t hi, int64_t lo, int64_t count) {
      std::vector<int64_t> out(count);
      for (int64_t i = 0; i < count; ++i) {
        out[i] = ((i / c.size(lo)) * c.stride(hi) + (i % c.size(lo)) * c.stride(lo)) * element_size;
      }
      return out;
    };
    Cache result{static_cast<char*>(cache.data_ptr()), c.stride(0) * element_size,
                 c.stride(3) * element_size, offsets(1, 2, block_size), offsets(4, 5, head_dim), true};
    for (int64_t d = 0; d < head_dim; ++d) {
      result.contiguous_dims = result.contiguous_dims && result.dim_offsets[d] == d * element_size;
    }
    return result;
  };
  const Cache caches[2] = {describe(key_cache), describe(value_cache)};
  const size_t row_bytes = static_cast<size_t>(head_dim * element_size);

  const int64_t num_work = num_requests * num_kv_heads;
  const int nthreads =
      at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t w = 0; w < num_work; ++w) {
    const int64_t r = w / num_kv_heads;
    const int64_t g = w % num_kv_heads;
    const int64_t count = kept_data[r];
    const int32_t* idx = keep_data + (r * index_sets + (index_sets == 1 ? 0 : g)) * max_kept;
    const int32_t* blocks = bt_data + r * max_blocks;
    // In-order is overlap-safe: idx is strictly increasing with idx[t] >= t, so
    // slot idx[t] is never a destination t' < t already written, nor read again.
    for (int64_t t = 0; t < count; ++t) {
      const int64_t src = idx[t];
      if (src == t) continue;
      const int64_t sb = blocks[src / block_size], ss = src % block_size;
      const int64_t db = blocks[t / block_size], ds = t % block_size;
      for (const Cache& c : caches) {
        char* dst_ptr = c.data + db * c.block_stride + c.slot_offsets[ds] + g * c.head_stride;
        const char* src_ptr = c.data + sb * c.block_stride + c.slot_offsets[ss] + g * c.head_stride;
        if (c.contiguous_dims) {
          std::memmove(dst_ptr, src_ptr, row_bytes);
        } else {  // vLLM's CPU caches store keys transposed, and AMX tiles them
          for (int64_t d = 0; d < head_dim; ++d) {
            std::memcpy(dst_ptr + c.dim_offsets[d], src_ptr + c.dim_offsets[d], element_size);
          }
        }
      }
    }
  }
}

}  // namespace prefixkv

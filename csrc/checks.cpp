// Argument checks shared by the CPU and CUDA backends, so both reject the same
// inputs with the same messages. Only metadata is inspected here (no tensor
// data is read), so this is cheap and device-agnostic; checks that need the
// contents of the index tensors live in the kernels' host code.
#include <ATen/ATen.h>

#include "ops.h"

namespace prefixkv {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Quantized KV caches whose keys importance reads (their scale folded into `scale`).
bool is_fp8(at::ScalarType t) {
  return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}

void check_paged_view(const at::Tensor& cache, const char* op, const char* name) {
  TORCH_CHECK(cache.dim() == 4 || cache.dim() == 6, op, ": ", name,
              " must be a [num_blocks, block_size, Hkv, D] view or its tiled 6-D form, got "
              "shape ",
              cache.sizes());
  TORCH_CHECK(paged_block_size(cache) > 0, op, ": ", name, " block_size must be > 0");
}

// head_dim (the last dim) must be contiguous; a size-1 dim has any stride.
bool last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1;
}

void check_int32_index(const at::Tensor& t, const char* op, const char* name,
                       int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim,
              "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name,
              " must be int32, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& ref, const at::Tensor& t,
                       const char* op, const char* ref_name, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ",
              t.device(), " but ", ref_name, " is on ", ref.device(),
              "; all tensors must be on the same device");
}

}  // namespace

at::Tensor tiled_view(const at::Tensor& cache) {
  if (cache.dim() == 6) return cache;
  return cache.unsqueeze(1).unsqueeze(4);
}

int64_t paged_block_size(const at::Tensor& cache) {
  return cache.dim() == 6 ? cache.size(1) * cache.size(2) : cache.size(1);
}

int64_t paged_num_kv_heads(const at::Tensor& cache) {
  return cache.dim() == 6 ? cache.size(3) : cache.size(2);
}

int64_t paged_head_dim(const at::Tensor& cache) {
  return cache.dim() == 6 ? cache.size(4) * cache.size(5) : cache.size(3);
}

void check_importance_args(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& block_table,
                           const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens,
                           const at::Tensor& min_query_pos,
                           const at::Tensor& scores,
                           const std::optional<at::Tensor>& lse) {
  constexpr const char* op = "prefixkv::importance";

  check_same_device(query, key_cache, op, "query", "key_cache");
  check_same_device(query, block_table, op, "query", "block_table");
  check_same_device(query, query_start_loc, op, "query", "query_start_loc");
  check_same_device(query, seq_lens, op, "query", "seq_lens");
  check_same_device(query, min_query_pos, op, "query", "min_query_pos");
  check_same_device(query, scores, op, "query", "scores");
  if (lse.has_value()) check_same_device(query, *lse, op, "query", "lse");

  TORCH_CHECK(query.dim() == 3, op, ": query must be [T, Hq, D], got shape ",
              query.sizes());
  check_paged_view(key_cache, op, "key_cache");
  TORCH_CHECK(is_supported_float(query.scalar_type()), op,
              ": query must be float32, bfloat16 or float16, got ",
              query.scalar_type());
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() || is_fp8(key_cache.scalar_type()), op,
              ": key_cache dtype ", key_cache.scalar_type(),
              " must match query dtype ", query.scalar_type(),
              " or be float8_e4m3fn / float8_e5m2");
  TORCH_CHECK(last_dim_contiguous(query), op,
              ": query head_dim must be contiguous (stride(2) == 1), got "
              "strides ",
              query.strides());

  const int64_t num_q_heads = query.size(1);
  const int64_t head_dim = query.size(2);
  const int64_t num_kv_heads = paged_num_kv_heads(key_cache);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, op,
              ": num query heads (", num_q_heads,
              ") must be a multiple of num kv heads (", num_kv_heads, ")");
  TORCH_CHECK(paged_head_dim(key_cache) == head_dim, op, ": key_cache head_dim (",
              paged_head_dim(key_cache), ") != query head_dim (", head_dim, ")");

  check_int32_index(block_table, op, "block_table", 2);
  check_int32_index(query_start_loc, op, "query_start_loc", 1);
  check_int32_index(seq_lens, op, "seq_lens", 1);
  check_int32_index(min_query_pos, op, "min_query_pos", 1);
  const int64_t batch = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == batch + 1, op,
              ": query_start_loc must have B + 1 = ", batch + 1,
              " entries, got ", query_start_loc.size(0));
  TORCH_CHECK(min_query_pos.size(0) == batch, op, ": min_query_pos must have B = ",
              batch, " entries, got ", min_query_pos.size(0));
  TORCH_CHECK(block_table.size(0) == batch, op, ": block_table must have B = ",
              batch, " rows, got ", block_table.size(0));

  TORCH_CHECK(scores.dim() == 3, op,
              ": scores must be [B, Hkv, max_keys], got shape ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat, op,
              ": scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(scores.size(0) == batch && scores.size(1) == num_kv_heads, op,
              ": scores must be [B, Hkv, max_keys] = [", batch, ", ",
              num_kv_heads, ", *], got shape ", scores.sizes());

  if (lse.has_value()) {
    const at::Tensor& l = *lse;
    TORCH_CHECK(l.scalar_type() == at::kFloat, op,
                ": lse must be float32, got ", l.scalar_type());
    TORCH_CHECK(l.dim() == 2 && l.size(0) == num_q_heads &&
                    l.size(1) == query.size(0),
                op, ": lse must be [Hq, T] = [", num_q_heads, ", ",
                query.size(0), "], got shape ", l.sizes());
  }
}

namespace {

// Every layer's cache must read like the first one's: one description serves all.
void check_same_layout(at::TensorList caches, const char* op, const char* name) {
  const at::Tensor& first = caches[0];
  check_paged_view(first, op, name);
  for (size_t l = 1; l < caches.size(); ++l) {
    const at::Tensor& c = caches[l];
    check_same_device(first, c, op, name, name);
    TORCH_CHECK(c.sizes() == first.sizes() && c.strides() == first.strides() &&
                    c.scalar_type() == first.scalar_type(),
                op, ": ", name, "[", l, "] (shape ", c.sizes(), ", strides ", c.strides(), ", ",
                c.scalar_type(), ") differs from ", name, "[0] (shape ", first.sizes(), ", strides ",
                first.strides(), ", ", first.scalar_type(), "); one call takes caches of one layout");
  }
}

}  // namespace

void check_compact_args(at::TensorList key_caches, at::TensorList value_caches,
                        const at::Tensor& layers, const at::Tensor& block_table,
                        const at::Tensor& keep_indices, const at::Tensor& num_kept) {
  constexpr const char* op = "prefixkv::compact";

  TORCH_CHECK(!key_caches.empty(), op, ": key_caches must hold at least one layer");
  TORCH_CHECK(value_caches.size() == key_caches.size(), op, ": ", key_caches.size(),
              " key_caches but ", value_caches.size(), " value_caches");
  check_same_layout(key_caches, op, "key_caches");
  check_same_layout(value_caches, op, "value_caches");
  const at::Tensor& key_cache = key_caches[0];
  const at::Tensor& value_cache = value_caches[0];
  check_same_device(key_cache, value_cache, op, "key_caches", "value_caches");
  check_same_device(key_cache, layers, op, "key_caches", "layers");
  check_same_device(key_cache, block_table, op, "key_caches", "block_table");
  check_same_device(key_cache, keep_indices, op, "key_caches", "keep_indices");
  check_same_device(key_cache, num_kept, op, "key_caches", "num_kept");

  // The two may tile differently (vLLM's AMX cache does), but hold the same tokens.
  TORCH_CHECK(value_cache.size(0) == key_cache.size(0) &&
                  paged_block_size(value_cache) == paged_block_size(key_cache) &&
                  paged_num_kv_heads(value_cache) == paged_num_kv_heads(key_cache) &&
                  paged_head_dim(value_cache) == paged_head_dim(key_cache),
              op, ": value_caches shape ", value_cache.sizes(),
              " holds other blocks, slots, heads or dims than key_caches shape ", key_cache.sizes());
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), op,
              ": value_caches dtype ", value_cache.scalar_type(),
              " != key_caches dtype ", key_cache.scalar_type());

  check_int32_index(layers, op, "layers", 1);
  check_int32_index(block_table, op, "block_table", 2);
  check_int32_index(keep_indices, op, "keep_indices", 3);
  check_int32_index(num_kept, op, "num_kept", 1);
  const int64_t num_items = num_kept.size(0);
  const int64_t num_kv_heads = paged_num_kv_heads(key_cache);
  TORCH_CHECK(layers.size(0) == num_items, op, ": layers must have I = ", num_items,
              " entries, got ", layers.size(0));
  TORCH_CHECK(block_table.size(0) == num_items, op,
              ": block_table must have I = ", num_items, " rows, got ",
              block_table.size(0));
  TORCH_CHECK(keep_indices.size(0) == num_items, op,
              ": keep_indices must be [I, Hs, K] with I = ", num_items,
              ", got shape ", keep_indices.sizes());
  TORCH_CHECK(keep_indices.size(1) == 1 || keep_indices.size(1) == num_kv_heads,
              op, ": keep_indices.shape[1] must be 1 (shared) or Hkv = ",
              num_kv_heads, ", got ", keep_indices.size(1));
}

}  // namespace prefixkv

// Declares the prefixkv op schemas and registers the CPU kernels. The CUDA
// kernels register against the same names from the _cuda_C library, so one
// `torch.ops.prefixkv.<op>` dispatches on the tensors' device.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(prefixkv, m) {
  m.def(
      "importance(Tensor query, Tensor key_cache, Tensor block_table, "
      "Tensor query_start_loc, Tensor seq_lens, Tensor min_query_pos, "
      "float scale, Tensor(a!) scores, Tensor? lse=None) -> ()");
  m.def(
      "compact(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor layers, "
      "Tensor block_table, Tensor keep_indices, Tensor num_kept) -> ()");
}

TORCH_LIBRARY_IMPL(prefixkv, CPU, m) {
  m.impl("importance", &prefixkv::importance_cpu);
  m.impl("compact", &prefixkv::compact_cpu);
}

"""CUDA ops against the pure-torch reference (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from prefixkv_vllm.ops import reference as ref

from .test_ops_cpu import (
    bits,
    build_importance_inputs,
    build_keep_indices,
    cache_views,
    compact_case,
    importance_case,
    make_block_table,
    make_caches,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# The CUDA kernels read head_dim rows with vector loads: FlashAttention-style layouts only.
CUDA_LAYOUTS = ("flash", "cpu", "interleaved")


@settings(max_examples=60, deadline=None)
@given(importance_case())
def test_importance_cuda_matches_reference(case):
    if case["layout"] not in CUDA_LAYOUTS:
        case["layout"] = "flash"
    x = build_importance_inputs(case)
    args = (x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"])
    lse = ref.attention_lse(*args[:5], x["scale"]) if case["pass_lse"] else None
    expected = x["scores"].clone()
    ref.importance(*args, expected, lse)
    actual = x["scores"].cuda()
    on_device = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    torch.ops.prefixkv.importance(*on_device, actual, None if lse is None else lse.cuda())
    torch.testing.assert_close(actual.cpu(), expected, rtol=2e-3, atol=2e-4)


@settings(max_examples=60, deadline=None)
@given(compact_case())
def test_compact_cuda_matches_reference(case):
    if case["layout"] not in CUDA_LAYOUTS:
        case["layout"] = "flash"
    gen = torch.Generator().manual_seed(case["seed"])
    table, num_blocks = make_block_table(case["lengths"], case["block_size"], gen)
    storage, _, _ = make_caches(
        case["layout"], num_blocks, case["block_size"], case["num_kv_heads"], case["head_dim"], case["dtype"], gen
    )
    keep = build_keep_indices(case["lengths"], case["kept"], 1 if case["shared"] else case["num_kv_heads"], gen)
    num_kept = torch.tensor(case["kept"], dtype=torch.int32)
    expected = storage.clone()
    ref.compact(*cache_views(case["layout"], expected, case["block_size"], case["head_dim"]), table, keep, num_kept)
    device_storage = storage.cuda()
    key, value = cache_views(case["layout"], device_storage, case["block_size"], case["head_dim"])
    torch.ops.prefixkv.compact(key, value, table.cuda(), keep.cuda(), num_kept.cuda())
    assert torch.equal(bits(device_storage.cpu()), bits(expected))

"""The CPU cache views the backend hands to the ops match how vLLM writes the cache."""

from __future__ import annotations

import pytest
import torch

vllm_ops = pytest.importorskip("vllm._custom_ops")

from prefixkv_vllm.vllm_adapter.backends.cpu_attn import SUPPORTED_ISAS, token_major_views  # noqa: E402


# vLLM runs vec for head dims that are multiples of 32 and vec16 for other multiples of 16.
@pytest.mark.parametrize("isa, block_size, head_dim", [("vec", 32, 64), ("vec", 64, 128), ("vec16", 32, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_major_views_match_vllm_cache_writes(isa, dtype, block_size, head_dim):
    assert isa in SUPPORTED_ISAS
    num_blocks, num_kv_heads, num_tokens = 5, 3, 90
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_pages, value_pages = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    key = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(torch.int64)
    vllm_ops.cpu_attn_reshape_and_cache(
        key, value, key_pages, value_pages, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
    )

    keys, values = token_major_views(kv_cache)
    blocks, offsets = slots // block_size, slots % block_size
    assert torch.equal(keys[blocks, offsets], key)
    assert torch.equal(values[blocks, offsets], value)
    # Views, not copies: what compaction writes through them lands in the cache.
    keys[blocks[0], offsets[0]] = values[blocks[1], offsets[1]]
    assert torch.equal(token_major_views(kv_cache)[0][blocks[0], offsets[0]], value[1])

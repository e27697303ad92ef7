"""The CPU cache views the backend hands to the ops match how vLLM writes the cache."""

from __future__ import annotations

import pytest
import torch

vllm_ops = pytest.importorskip("vllm._custom_ops")

from prefixkv_vllm.vllm_adapter.backends.cpu_attn import SUPPORTED_ISAS, token_major_views  # noqa: E402


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, head_dim", [(32, 64), (64, 128), (32, 80)])
def test_token_major_views_match_vllm_cache_writes(isa, dtype, block_size, head_dim):
    if isa == "vec16" and head_dim % 32 == 0:
        pytest.skip("vLLM picks vec16 only for head dims that are not multiples of 32")
    if isa == "vec" and head_dim % 32:
        pytest.skip("vLLM picks vec only for head dims that are multiples of 32")
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
    assert keys.data_ptr() >= kv_cache.data_ptr()  # views, not copies: compaction writes through them
    keys[blocks[0], offsets[0]] = 0
    assert kv_cache.abs().sum() < torch.cat([key, value]).abs().sum().to(kv_cache.dtype) * 2

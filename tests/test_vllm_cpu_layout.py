"""The CPU cache views the backend hands to the ops match how vLLM writes the cache."""

from __future__ import annotations

import pytest
import torch

vllm_ops = pytest.importorskip("vllm._custom_ops")

from prefixkv_vllm.ops import reference as ref  # noqa: E402
from prefixkv_vllm.vllm_adapter.backends import FP8_CACHE_DTYPES  # noqa: E402
from prefixkv_vllm.vllm_adapter.backends.cpu_attn import PAGE_VIEWS, paged_views  # noqa: E402

from .cpu_features import needs_avx512  # noqa: E402

# vLLM runs vec for head dims that are multiples of 32, vec16 for other multiples of 16, and amx
# for bf16 on AMX CPUs; its fp8 caches need AVX-512 (and head dims that are multiples of 32).
CASES = [
    ("vec", "auto", torch.float32, 32, 64),
    ("vec", "auto", torch.bfloat16, 64, 128),
    ("vec16", "auto", torch.float32, 32, 80),
    ("vec16", "auto", torch.bfloat16, 32, 80),
    pytest.param("amx", "auto", torch.bfloat16, 32, 64, marks=needs_avx512),
    pytest.param("amx", "auto", torch.bfloat16, 64, 128, marks=needs_avx512),
    pytest.param("vec", "fp8", torch.float32, 32, 64, marks=needs_avx512),
    pytest.param("vec", "fp8_e5m2", torch.bfloat16, 32, 64, marks=needs_avx512),
    pytest.param("amx", "fp8", torch.bfloat16, 32, 64, marks=needs_avx512),
    pytest.param("amx", "fp8_e5m2", torch.bfloat16, 64, 128, marks=needs_avx512),
]


def test_every_kernel_is_checked():
    assert {case.values[0] if hasattr(case, "values") else case[0] for case in CASES} == set(PAGE_VIEWS)


@pytest.mark.parametrize("isa, cache_dtype, dtype, block_size, head_dim", CASES)
def test_paged_views_match_vllm_cache_writes(isa, cache_dtype, dtype, block_size, head_dim):
    num_blocks, num_kv_heads, num_tokens, k_scale = 5, 3, 90, 0.5
    storage = torch.uint8 if cache_dtype in FP8_CACHE_DTYPES else dtype
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim, dtype=storage)
    key_pages, value_pages = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    key, value = torch.randn(2, num_tokens, num_kv_heads, head_dim)
    if cache_dtype in FP8_CACHE_DTYPES:
        # Values fp8 holds exactly once divided by the scale: vLLM's rounding is not torch's (it truncates).
        fp8 = FP8_CACHE_DTYPES[cache_dtype]
        key, value = key.to(fp8).float() * k_scale, value.to(fp8).float() * k_scale
    key, value = key.to(dtype), value.to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(torch.int64)
    vllm_ops.cpu_attn_reshape_and_cache(
        key, value, key_pages, value_pages, slots, isa, k_scale=k_scale, v_scale=k_scale, kv_cache_dtype=cache_dtype
    )

    keys, values = paged_views(kv_cache, isa, cache_dtype)
    table = slots.view(-1, 1).div(block_size, rounding_mode="floor").to(torch.int32)
    offsets = slots % block_size
    # Each token as its own one-slot sequence: gather slot `offset` of block `table[t]`.
    read_keys = torch.stack([ref.paged_tokens(keys, table[t], int(offsets[t]) + 1)[-1] for t in range(num_tokens)])
    read_values = torch.stack([ref.paged_tokens(values, table[t], int(offsets[t]) + 1)[-1] for t in range(num_tokens)])
    if cache_dtype in FP8_CACHE_DTYPES:  # stored as key / k_scale
        assert read_keys.dtype == FP8_CACHE_DTYPES[cache_dtype]
        assert torch.equal(read_keys.float() * k_scale, key.float())
        assert torch.equal(read_values.float() * k_scale, value.float())
    else:
        assert torch.equal(read_keys, key)
        assert torch.equal(read_values, value)
    # Views, not copies: what compaction writes through them lands in the cache. Token 1 moves
    # to slot 0 of token 0's block.
    two_blocks = torch.cat([table[0], table[1]])[None]
    keep = torch.tensor([[[block_size + int(offsets[1])]]], dtype=torch.int32)
    ref.compact([keys], [values], torch.zeros(1, dtype=torch.int32), two_blocks, keep, torch.ones(1, dtype=torch.int32))
    moved = ref.paged_tokens(paged_views(kv_cache, isa, cache_dtype)[0], two_blocks[0], 1)[0]
    assert torch.equal(moved.float(), read_keys[1].float())

"""PrefixKV on vLLM's CPU attention backend (``CPU_ATTN``).

The stock kernel runs unchanged; the builder hands it each group's compacted
block table and shortened lengths, and the impl scores and compacts the prompt
after the kernel ran (``core``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ..config import PrefixKVConfigError
from .core import PrefixKVBuilderMixin, PrefixKVImplMixin, StepWork

# Kernels whose cache layout token_major_views describes (checked against
# cpu_attn_reshape_and_cache in tests/test_vllm_cpu_layout.py).
SUPPORTED_ISAS = ("vec", "vec16")


@dataclass
class PrefixKVCPUMetadata(CPUAttentionMetadata):
    prefixkv: StepWork | None = None


class PrefixKVCPUMetadataBuilder(PrefixKVBuilderMixin, CPUAttentionMetadataBuilder):
    metadata_cls = PrefixKVCPUMetadata

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.prefixkv_policy is not None and self.isa not in SUPPORTED_ISAS:
            raise PrefixKVConfigError(
                f"PrefixKV reads the CPU KV cache as the vec/vec16 attention kernels lay it out; this model "
                f"runs the {self.isa!r} kernel (bf16 on AMX CPUs): use --dtype float32 or float16"
            )


def token_major_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as ``[num_blocks, block_size, Hkv, D]`` views of the CPU cache.

    Each (block, head) page of the CPU cache holds the block's keys transposed
    (``[D, block_size]``, as ``cpu_attn_reshape_and_cache`` writes them for the
    vec/vec16 kernels), then its values token-major (``[block_size, D]``). So the
    key view's head_dim stride is ``block_size``; the CPU ops take any strides.
    """
    num_blocks, num_kv_heads, block_size, two_head_dims = kv_cache.shape
    head_dim = two_head_dims // 2
    pages = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim)
    keys = pages[:, :, 0].unflatten(2, (head_dim, block_size)).permute(0, 3, 1, 2)
    values = pages[:, :, 1].unflatten(2, (block_size, head_dim)).permute(0, 2, 1, 3)
    return keys, values


class PrefixKVCPUAttentionImpl(PrefixKVImplMixin, CPUAttentionBackendImpl):
    token_major_views = staticmethod(token_major_views)


class PrefixKVCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return PrefixKVCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PrefixKVCPUMetadataBuilder

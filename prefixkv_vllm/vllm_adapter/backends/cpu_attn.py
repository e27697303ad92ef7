"""PrefixKV on vLLM's CPU attention backend (``CPU_ATTN``).

The stock kernel runs unchanged; the builder hands it each group's compacted
block table and shortened lengths, and the impl scores and compacts the prompt
after the kernel ran (``core``).

vLLM's CPU kernels lay out each (block, KV head) page of the cache their own way
(``cpu_attn_reshape_and_cache``): ``paged_views`` describes the page of every
kernel named in ``PAGE_VIEWS``, in the cache's stored dtype (fp8 caches too);
``tests/test_vllm_cpu_layout.py`` checks each view against what vLLM writes.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ...config import PrefixKVConfigError
from . import FP8_CACHE_DTYPES
from .core import PrefixKVBuilderMixin, PrefixKVImplMixin, StepWork

logger = init_logger("vllm.prefixkv")


def vec_views(pages: torch.Tensor, block_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vec/vec16 pages: the block's keys transposed (``[D, block_size]``), then its values token-major."""
    keys = pages[:, :, 0].unflatten(2, (head_dim, block_size)).permute(0, 3, 1, 2)
    values = pages[:, :, 1].unflatten(2, (block_size, head_dim)).permute(0, 2, 1, 3)
    return keys, values


def amx_views(pages: torch.Tensor, block_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """amx pages, as tiled views (``ops.reference``): 64-byte tile rows of packed pairs.

    Keys come in groups of 16 slots, each a ``[D/2, 16, 2]`` array of dim pairs: key
    (s, d) at ``(s // 16) 16D + (d // 2) 32 + (s % 16) 2 + d % 2``. Values come in
    groups of 16 dims, each a ``[block_size/2, 16, 2]`` array of slot pairs: value
    (s, d) at ``(d // 16) 16 block_size + (s // 2) 32 + (d % 16) 2 + s % 2``. fp8
    caches keep the same element positions.
    """
    keys = pages[:, :, 0].unflatten(2, (block_size // 16, head_dim // 2, 16, 2)).permute(0, 2, 4, 1, 3, 5)
    values = pages[:, :, 1].unflatten(2, (head_dim // 16, block_size // 2, 16, 2)).permute(0, 3, 5, 1, 2, 4)
    return keys, values


# Kernel (vLLM's ``isa``) -> its page layout.
PAGE_VIEWS = types.MappingProxyType({"vec": vec_views, "vec16": vec_views, "amx": amx_views})


def paged_views(kv_cache: torch.Tensor, isa: str, cache_dtype: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as paged views of vLLM's CPU cache ``[num_blocks, Hkv, block_size, 2D]``."""
    num_blocks, num_kv_heads, block_size, two_head_dims = kv_cache.shape
    if cache_dtype in FP8_CACHE_DTYPES:
        kv_cache = kv_cache.view(FP8_CACHE_DTYPES[cache_dtype])  # vLLM allocates fp8 caches as bytes
    pages = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * two_head_dims // 2)
    return PAGE_VIEWS[isa](pages, block_size, two_head_dims // 2)


@dataclass
class PrefixKVCPUMetadata(CPUAttentionMetadata):
    prefixkv: StepWork | None = None


class PrefixKVCPUMetadataBuilder(PrefixKVBuilderMixin, CPUAttentionMetadataBuilder):
    metadata_cls = PrefixKVCPUMetadata

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.prefixkv_policy is None:
            return
        if self.isa not in PAGE_VIEWS:
            raise PrefixKVConfigError(
                f"PrefixKV reads the CPU KV cache as vLLM's {'/'.join(PAGE_VIEWS)} attention kernels lay it out; "
                f"this model runs the {self.isa!r} kernel"
            )
        # Which kernel ran is the first thing a CPU throughput comparison needs to know.
        logger.info_once("PrefixKV: vLLM's CPU attention runs the %r kernel on a %s KV cache", self.isa, self.kv_cache_dtype)


class PrefixKVCPUAttentionImpl(PrefixKVImplMixin, CPUAttentionBackendImpl):
    def paged_views(self, layer, kv_cache):
        return paged_views(kv_cache, layer.isa, self.kv_cache_dtype)


class PrefixKVCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return PrefixKVCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PrefixKVCPUMetadataBuilder

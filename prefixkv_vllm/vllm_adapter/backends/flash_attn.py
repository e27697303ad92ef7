"""PrefixKV on vLLM's FlashAttention backend (CUDA). Written against vLLM 0.32; not yet run on a GPU.

A policy selects it for full-attention layers (``AttentionBackendEnum.CUSTOM``). It needs vLLM's V1 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0``; the start-up check says so) and runs attention
outside CUDA graphs: the builder reports no full-CUDA-graph support, so vLLM
keeps piecewise graphs with eager attention, where scoring and compaction run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import is_quantized_kv_cache

from .core import PrefixKVBuilderMixin, PrefixKVImplMixin, StepWork


@dataclass
class PrefixKVFlashAttentionMetadata(FlashAttentionMetadata):
    prefixkv: StepWork | None = None


class PrefixKVFlashAttentionMetadataBuilder(PrefixKVBuilderMixin, FlashAttentionMetadataBuilder):
    metadata_cls = PrefixKVFlashAttentionMetadata
    _cudagraph_support = AttentionCGSupport.NEVER
    # Each group's effective block table differs; the stock shortcut copies group 0's.
    supports_update_block_table = False


def paged_views(kv_cache: torch.Tensor, fp8_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's ``[blocks, H, N, 2D]`` cache as ``[blocks, N, H, D]`` K and V views.

    ``fp8_dtype``: how an fp8 cache's bytes read (vLLM allocates them as bytes).
    """
    if fp8_dtype is not None:
        kv_cache = kv_cache.view(fp8_dtype)
    head_dim = kv_cache.shape[-1] // 2
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_dim, dim=-1)
    return key_cache, value_cache


class PrefixKVFlashAttentionImpl(PrefixKVImplMixin, FlashAttentionImpl):
    def paged_views(self, layer, kv_cache):
        # As FlashAttentionImpl.forward reads a quantized cache.
        fp8_dtype = current_platform.fp8_dtype() if is_quantized_kv_cache(self.kv_cache_dtype) else None
        return paged_views(kv_cache, fp8_dtype)


class PrefixKVFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return PrefixKVFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PrefixKVFlashAttentionMetadataBuilder

"""PrefixKV on vLLM's CPU attention backend (``CPU_ATTN``).

The stock kernel runs unchanged; the builder hands it each group's compacted
block table and shortened lengths, and the impl scores and compacts the prompt
after the kernel ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ..config import PrefixKVConfig, PrefixKVConfigError
from ..kv_spec import PrefixKVAttentionSpec
from ..worker_state import current_batch, policy_for
from .core import StepWork, after_attention, plan_step


# Kernels whose cache layout token_major_views describes (checked against
# cpu_attn_reshape_and_cache in tests/test_vllm_cpu_layout.py).
SUPPORTED_ISAS = ("vec", "vec16")


@dataclass
class PrefixKVCPUMetadata(CPUAttentionMetadata):
    prefixkv: StepWork | None = None


class PrefixKVCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.prefixkv_policy = policy_for(PrefixKVConfig.from_additional_config(vllm_config.additional_config))
        if self.prefixkv_policy is not None and self.isa not in SUPPORTED_ISAS:
            raise PrefixKVConfigError(
                f"PrefixKV reads the CPU KV cache as the vec/vec16 attention kernels lay it out; this model "
                f"runs the {self.isa!r} kernel (bf16 on AMX CPUs): use --dtype float32 or float16"
            )

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> CPUAttentionMetadata:
        spec = self.kv_cache_spec
        if not isinstance(spec, PrefixKVAttentionSpec) or self.prefixkv_policy is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = plan_step(
            spec,
            self.prefixkv_policy,
            current_batch(),
            common_attn_metadata.query_start_loc_cpu,
            common_attn_metadata.seq_lens,
            common_attn_metadata.block_table_tensor,
        )
        if plan is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        effective = common_attn_metadata.replace(
            seq_lens=plan.seq_lens, block_table_tensor=plan.block_table, max_seq_len=plan.max_seq_len
        )
        metadata = super().build(common_prefix_len, effective, fast_build)
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return PrefixKVCPUMetadata(**fields, prefixkv=plan.work)


class PrefixKVCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        work = getattr(attn_metadata, "prefixkv", None)
        if work is not None:
            key_cache, value_cache = token_major_views(kv_cache)
            num_tokens = attn_metadata.num_actual_tokens
            after_attention(work, layer.layer_name, query[:num_tokens], key_cache, value_cache, self.scale)
        return output


def token_major_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as ``[num_blocks, block_size, Hkv, D]`` views of the CPU cache.

    Each (block, head) page of the CPU cache holds the block's keys transposed
    (``[D, block_size]``, as ``cpu_attn_reshape_and_cache`` writes them for the
    vec/vec16 kernels), then its values token-major (``[block_size, D]``). So the
    key view's head_dim stride is ``block_size``; the ops take any strides.
    """
    num_blocks, num_kv_heads, block_size, two_head_dims = kv_cache.shape
    head_dim = two_head_dims // 2
    pages = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim)
    keys = pages[:, :, 0].unflatten(2, (head_dim, block_size)).permute(0, 3, 1, 2)
    values = pages[:, :, 1].unflatten(2, (block_size, head_dim)).permute(0, 2, 1, 3)
    return keys, values


class PrefixKVCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return PrefixKVCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PrefixKVCPUMetadataBuilder


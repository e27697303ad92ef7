"""Attention backends: stock kernels, plus PrefixKV scoring, compaction and effective metadata.

A compressed layer must run a PrefixKV backend: a stock one would neither compact its
prompt nor read the shortened block table, and would attend over freed blocks that
other requests now own. With a policy, start-up selects the platform's PrefixKV
backend as ``AttentionBackendEnum.CUSTOM`` for full-attention layers
(``startup.select_attention_backend``), the worker registers it
(``use_prefixkv_backend``), and once the KV cache exists checks the result and hands
the model runner's PrefixKV state to the builders (``attach_state``).
"""

from __future__ import annotations

import functools
import types

import torch

from ...config import PrefixKVConfigError

# The quantized KV caches PrefixKV reads (fp8 per tensor, stored as key / k_scale), and
# how their bytes read on the CPU (FlashAttention reads them as the platform's fp8 dtype).
FP8_CACHE_DTYPES = types.MappingProxyType(
    {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
)

# Platform -> the PrefixKV backend wrapping its stock attention.
BACKENDS = types.MappingProxyType(
    {
        "cpu": "prefixkv_vllm.vllm_adapter.backends.cpu_attn.PrefixKVCPUBackend",
        "cuda": "prefixkv_vllm.vllm_adapter.backends.flash_attn.PrefixKVFlashAttentionBackend",
    }
)


def backend_path(platform) -> str | None:
    """The PrefixKV backend for ``platform`` (vLLM's ``current_platform``), if there is one."""
    for name, path in BACKENDS.items():
        if getattr(platform, f"is_{name}")():
            return path
    return None


@functools.cache
def use_prefixkv_backend() -> None:
    """Resolve ``CUSTOM`` to this platform's PrefixKV backend in this process (worker side)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    path = backend_path(current_platform)
    if path is None:
        return  # start-up refused this platform already
    register_backend(AttentionBackendEnum.CUSTOM, path)
    if current_platform.is_cpu():
        _honour_custom_on_cpu(type(current_platform))


def _honour_custom_on_cpu(platform_cls) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    # The CPU platform answers CPU_ATTN whatever was selected; CUSTOM is ours here.
    original = platform_cls.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
        if selected_backend == AttentionBackendEnum.CUSTOM:
            return AttentionBackendEnum.CUSTOM.get_path()
        return original(cls, selected_backend, *args, **kwargs)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def attach_state(attn_groups, state) -> dict[str, int]:
    """Every layer with a PrefixKV spec runs a PrefixKV backend (the runner's ``attn_groups``),
    whose metadata builders get the model runner's ``state`` (``worker_state.WorkerState``).

    Returns the compressed layers per backend class, for the start-up log.
    """
    from ..kv_spec import PrefixKVAttentionSpec
    from .core import PrefixKVBuilderMixin

    compressed: dict[str, int] = {}
    for groups in attn_groups:
        for group in groups:
            if not isinstance(group.kv_cache_spec, PrefixKVAttentionSpec):
                continue
            backend = group.backend
            name = f"{backend.__module__}.{backend.__qualname__}"
            if not issubclass(backend.get_builder_cls(), PrefixKVBuilderMixin):
                raise PrefixKVConfigError(
                    f"layer {group.layer_names[0]} runs the {backend.get_name()} attention backend "
                    f"({name}), not PrefixKV's: it would read freed blocks"
                )
            for builder in group.metadata_builders:
                builder.prefixkv_state = state
            compressed[name] = compressed.get(name, 0) + len(group.layer_names)
    return compressed

"""The ``vllm.general_plugins`` entry point (plugin name: ``prefixkv``).

vLLM calls ``register()`` in every process it starts (API server, engine core,
workers); it is idempotent and cheap. It always adds the ``--kv-*`` flags and the
start-up checks (``hooks.engine_args``). Where the installed vLLM is the one the
plugin was written for (``compat``: its version and every internal in
``compat.INTERNALS``), it also registers the KV-cache spec and its manager and hooks
the model runner, the scheduler and the input processor (``hooks``); elsewhere a
policy fails at start-up with the reason, in one line, and without a policy the
plugin stays inert on any vLLM.
"""

from __future__ import annotations

from ..config import PrefixKVConfigError
from .compat import SUPPORTED_VLLM, vllm_problem

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from .hooks import engine_args

    # vLLM's own methods, before any hook wraps them (the wrappers read the same through functools.wraps).
    problem = vllm_problem()
    engine_args.install()
    if problem is not None:
        return  # startup.configure_engine refuses a policy with that reason
    from .hooks import input_processor, model_runner, scheduler

    _register_kv_spec()
    model_runner.install()
    scheduler.install()
    input_processor.install()


def _register_kv_spec() -> None:
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from .kv_spec import PrefixKVAttentionManager, PrefixKVAttentionSpec

    # The registry skips its built-ins once anything is registered: add them first.
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(
        PrefixKVAttentionSpec, PrefixKVAttentionManager, uniform_type_base_spec=PrefixKVAttentionSpec
    )


__all__ = ["SUPPORTED_VLLM", "PrefixKVConfigError", "register"]

"""The plugin's hooks into vLLM, one module per vLLM object they bind.

``engine_args`` patches ``EngineArgs`` at ``register()`` (flags, start-up). The others
hook a constructor and, only on an instance whose ``additional_config`` has an active
policy, bind per-step wrappers on that instance (``bind_when_active``): an instance
without one keeps vLLM's own methods. Every vLLM method they touch is in
``compat.INTERNALS``.
"""

from __future__ import annotations

import functools

from ...config import PrefixKVConfig


def bind_when_active(cls, bind) -> None:
    """After ``cls.__init__``, ``bind(instance, config)`` if the instance's config has a policy."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        config = PrefixKVConfig.from_additional_config(self.vllm_config.additional_config)
        if config.active:
            bind(self, config)

    cls.__init__ = __init__

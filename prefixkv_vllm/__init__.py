"""PrefixKV adaptive per-layer KV-cache budgets for vLLM's V1 engine."""

__version__ = "0.1.0"

"""The vLLM adapter: plugin registration, flags, KV spec and manager, attention backends."""

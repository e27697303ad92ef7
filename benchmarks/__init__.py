"""Benchmarks of prefixkv-vllm. Run one from the repository root as ``python benchmarks/NAME.py``
(or ``python -m benchmarks.NAME``); each writes its tables and plots under ``benchmarks/results``."""

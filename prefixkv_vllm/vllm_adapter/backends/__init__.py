"""Attention backends: stock kernels, plus PrefixKV scoring, compaction and effective metadata."""

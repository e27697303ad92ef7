"""Skip marks for tests that need a CPU feature this machine may lack (the project's machines differ)."""

from __future__ import annotations

import pytest
import torch

HAS_AVX512 = torch.cpu._is_avx512_supported()
HAS_AMX = torch.cpu._is_amx_tile_supported()  # vLLM runs bf16 on its 'amx' kernel where this holds

# vLLM's AVX2 kernel library has no fp8 or AMX cache writer (seen: "Unsupported CPU attention
# configuration"), and vLLM refuses fp8 KV caches on CPUs without AVX-512.
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="needs an AVX-512 CPU (vLLM's fp8 and AMX cache layouts)")

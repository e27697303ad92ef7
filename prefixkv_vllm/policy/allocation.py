"""Allocators: how many prompt tokens each layer keeps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from .curves import importance_curves, search_prefix_config


class Allocator(ABC):
    """Maps a prompt (and, if ``needs_scores``, its per-layer scores) to kept counts."""

    needs_scores = False

    @abstractmethod
    def keep_counts(self, prompt_len: int, num_layers: int, layer_scores: torch.Tensor | None) -> torch.Tensor:
        """Kept tokens per layer, ``[L]`` int64, before protected tokens are added."""


def _check_budget(budget: float) -> float:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return float(budget)


@dataclass(frozen=True)
class UniformAllocator(Allocator):
    """The same fraction in every layer (H2O, SnapKV, StreamingLLM)."""

    budget: float

    def __post_init__(self):
        _check_budget(self.budget)

    def keep_counts(self, prompt_len, num_layers, layer_scores=None):
        return torch.full((num_layers,), round(self.budget * prompt_len), dtype=torch.int64)


@dataclass(frozen=True)
class ProfileAllocator(Allocator):
    """Offline per-layer ratios: ``round(r_l * S)`` with no search (the paper's serving mode)."""

    keep_ratios: Sequence[float]

    def keep_counts(self, prompt_len, num_layers, layer_scores=None):
        if len(self.keep_ratios) != num_layers:
            raise ValueError(f"{len(self.keep_ratios)} keep ratios for {num_layers} layers")
        ratios = torch.tensor(self.keep_ratios, dtype=torch.float64)
        return torch.round(ratios * prompt_len).to(torch.int64)


@dataclass(frozen=True)
class PrefixSearchAllocator(Allocator):
    """Online PrefixKV: every layer keeps the same share of its own attention mass."""

    budget: float
    needs_scores = True

    def __post_init__(self):
        _check_budget(self.budget)

    def keep_counts(self, prompt_len, num_layers, layer_scores):
        if layer_scores is None or layer_scores.shape != (num_layers, prompt_len):
            raise ValueError(f"prefix search needs scores [{num_layers}, {prompt_len}]")
        return search_prefix_config(importance_curves(layer_scores), self.budget)

"""Token scorers: how important each prompt token is to one layer.

The ``importance`` op accumulates, per KV head, the attention each key receives
from the prompt queries at positions ``>= min_query_pos(prompt_len)``. A scorer
chooses those queries and turns the accumulated sums into scores. Scoring is
independent of allocation (how many tokens each layer keeps), so any scorer can
be combined with any allocator.
"""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Scorer(ABC):
    """Turns accumulated attention ``[Hkv, S]`` into scores ``[1 or Hkv, S]``."""

    per_kv_head: bool = False
    needs_attention = True

    def min_query_pos(self, prompt_len: int) -> int:
        """First absolute query position whose attention counts."""
        return 0

    def scores(self, accumulated: torch.Tensor, prompt_len: int) -> torch.Tensor:
        per_head = self._per_head_scores(accumulated[:, :prompt_len].float(), prompt_len)
        return per_head if self.per_kv_head else per_head.mean(dim=0, keepdim=True)

    @abstractmethod
    def _per_head_scores(self, accumulated: torch.Tensor, prompt_len: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class RawScorer(Scorer):
    """The paper's accumulated attention (H2O). Favours early tokens: more queries see them."""

    name = "raw"

    def _per_head_scores(self, accumulated, prompt_len):
        return accumulated


@dataclass(frozen=True)
class MeanScorer(Scorer):
    """Accumulated attention divided by how many queries see each key (kvpress's observed attention)."""

    name = "mean"

    def _per_head_scores(self, accumulated, prompt_len):
        observers = torch.arange(prompt_len, 0, -1, dtype=accumulated.dtype, device=accumulated.device)
        return accumulated / observers


@dataclass(frozen=True)
class WindowScorer(Scorer):
    """Attention from the last ``window`` prompt queries only (SnapKV): they see the question."""

    window: int = 32
    name = "window"

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window scorer needs window >= 1, got {self.window}")

    def min_query_pos(self, prompt_len: int) -> int:
        return max(0, prompt_len - self.window)

    def _per_head_scores(self, accumulated, prompt_len):
        return accumulated / min(self.window, prompt_len)


@dataclass(frozen=True)
class SnapKVScorer(WindowScorer):
    """Window scores averaged over ``kernel`` neighbouring tokens (SnapKV's pooling, kernel 7).

    A lone token of a span (a digit of a number, a piece of a name) rarely takes
    the most attention on its own; pooling lets its neighbours' attention count
    for it, so a span is kept or dropped as a whole. Padding counts as zero
    attention (``avg_pool1d``'s default, as in SnapKV), so the prompt's first and
    last ``kernel // 2`` tokens score a little lower than inside tokens.
    """

    kernel: int = 7
    name = "snapkv"

    def __post_init__(self):
        super().__post_init__()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv scorer needs an odd kernel >= 1 (the output must keep its length), got {self.kernel}")

    def _per_head_scores(self, accumulated, prompt_len):
        window_scores = super()._per_head_scores(accumulated, prompt_len)
        return F.avg_pool1d(window_scores.unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2).squeeze(1)


@dataclass(frozen=True)
class RecencyScorer(Scorer):
    """Later tokens score higher (StreamingLLM with the protected sink tokens); reads no attention."""

    name = "recency"
    needs_attention = False

    def _per_head_scores(self, accumulated, prompt_len):
        positions = torch.arange(1, prompt_len + 1, dtype=torch.float32, device=accumulated.device)
        return positions.expand(accumulated.shape[0], -1)


SCORERS: types.MappingProxyType[str, type[Scorer]] = types.MappingProxyType(
    {cls.name: cls for cls in (RawScorer, MeanScorer, WindowScorer, SnapKVScorer, RecencyScorer)}
)


def make_scorer(name: str, *, per_kv_head: bool = False, window: int = 32) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    scorer_class = SCORERS[name]
    if issubclass(scorer_class, WindowScorer):
        return scorer_class(per_kv_head=per_kv_head, window=window)
    return scorer_class(per_kv_head=per_kv_head)

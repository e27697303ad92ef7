"""KV policies: a scorer, an allocator and the protected tokens, by name.

Every policy runs the same code path (score, allocate, select), so comparisons
between them measure the method and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .allocation import Allocator, PrefixSearchAllocator, ProfileAllocator, UniformAllocator
from .budget import check_budget
from .profile import Profile
from .scorers import RecencyScorer, Scorer, make_scorer
from .selection import Protection, clamp_keep_counts, select_tokens

POLICY_NAMES = ("none", "prefixkv", "uniform", "streaming")


@dataclass(frozen=True)
class KVPolicy:
    name: str
    scorer: Scorer
    allocator: Allocator
    protection: Protection

    def keep_counts(self, prompt_len: int, num_layers: int, layer_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Kept tokens per layer, protected tokens included (``[L]`` int64)."""
        counts = self.allocator.keep_counts(prompt_len, num_layers, layer_scores)
        return clamp_keep_counts(counts, prompt_len, self.protection)

    def plan(self, accumulated: list[torch.Tensor], prompt_len: int) -> list[torch.Tensor]:
        """Kept positions per layer, ``[Hs, k_l]`` each, from per-layer accumulated attention ``[Hkv, S]``."""
        scores = [self.scorer.scores(layer, prompt_len) for layer in accumulated]
        layer_scores = torch.stack([s.mean(dim=0) for s in scores]) if self.allocator.needs_scores else None
        counts = self.keep_counts(prompt_len, len(accumulated), layer_scores)
        return [select_tokens(s, int(k), self.protection) for s, k in zip(scores, counts)]


def build_policy(
    name: str,
    budget: float,
    *,
    scorer: str,
    per_kv_head: bool,
    window: int,
    sink: int,
    recent: int,
    profile: Profile | None = None,
) -> KVPolicy | None:
    """The policy called ``name``, or ``None`` for ``"none"`` (stock vLLM).

    The settings' defaults are the server's (``config.PrefixKVConfig``); ``profile``: per-layer
    ratios for ``prefixkv`` (without one it searches them per prompt).
    """
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    try:
        budget = check_budget(budget)
    except ValueError as exc:
        raise ValueError(f"KV budget {exc}") from None
    if name == "none":
        return None
    if recent < 1:
        raise ValueError(f"recent must be >= 1 (the last prompt token is always kept), got {recent}")
    if profile is not None and name != "prefixkv":
        raise ValueError(f"a profile sets per-layer ratios; the {name!r} policy does not use one")
    protection = Protection(sink=sink, recent=recent)
    if name == "streaming":
        return KVPolicy(name, RecencyScorer(per_kv_head=False), UniformAllocator(budget), protection)
    token_scorer = make_scorer(scorer, per_kv_head=per_kv_head, window=window)
    if name == "uniform":
        return KVPolicy(name, token_scorer, UniformAllocator(budget), protection)
    allocator = ProfileAllocator(profile.keep_ratios(budget)) if profile else PrefixSearchAllocator(budget)
    return KVPolicy(name, token_scorer, allocator, protection)

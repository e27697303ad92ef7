"""Which tokens a layer keeps, given its scores and its kept count."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Protection:
    """Tokens kept whatever their score.

    ``sink`` first tokens (attention sinks; the paper protects 1, the BOS) and the
    ``recent`` last prompt tokens. User-facing policies protect at least the last
    prompt token (the first decoded token is computed from it); ``recent=0`` is
    for the paged layout, where the prompt's tail already stays in place.
    """

    sink: int = 1
    recent: int = 1

    def __post_init__(self):
        if self.sink < 0 or self.recent < 0:
            raise ValueError(f"need sink >= 0 and recent >= 0, got sink={self.sink} recent={self.recent}")

    def count(self, prompt_len: int) -> int:
        return min(prompt_len, self.sink + self.recent)

    def mask(self, prompt_len: int, device=None) -> torch.Tensor:
        positions = torch.arange(prompt_len, device=device)
        return (positions < self.sink) | (positions >= prompt_len - self.recent)


def clamp_keep_counts(counts: torch.Tensor, prompt_len: int, protection: Protection) -> torch.Tensor:
    """Kept counts raised to the protected tokens and capped at the prompt."""
    return counts.clamp(min=protection.count(prompt_len), max=prompt_len)


def select_tokens(scores: torch.Tensor, keep: int, protection: Protection) -> torch.Tensor:
    """Top-``keep`` token positions per row of ``scores`` ``[Hs, S]``, protected first.

    Returns ``[Hs, keep]`` int64 positions in increasing order (the order ``compact``
    needs). Ties break towards the earlier position, so the choice is deterministic.
    """
    num_rows, prompt_len = scores.shape
    if not protection.count(prompt_len) <= keep <= prompt_len:
        raise ValueError(f"keep={keep} must lie in [{protection.count(prompt_len)}, {prompt_len}]")
    ranked = scores.float().masked_fill(protection.mask(prompt_len, scores.device), float("inf"))
    # A stable descending sort keeps earlier positions first among equal scores.
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :keep]
    return order.sort(dim=1).values

"""Importance curves and the global-prefix search (PrefixKV, arXiv 2412.03409).

For each layer, sorting its token scores in descending order, normalising them
to sum 1 and taking the cumulative sum gives the layer's *priority curve*:
``curve[k - 1]`` is the share of the layer's attention mass held by its top-k
tokens. A threshold ``p`` gives every layer the smallest prefix with share at
least ``p``; the search picks ``p`` so that the prefixes add up to the budget.
"""

from __future__ import annotations

import torch

MAX_SEARCH_ITERATIONS = 64  # float64 bisection on [0, 1] is exhausted well before this
SHARE_TOLERANCE = 1e-12


def importance_curves(scores: torch.Tensor) -> torch.Tensor:
    """Priority curves ``[L, S]`` (float64) from per-layer scores ``[L, S]``.

    A layer whose scores are all zero has no preference, so it gets the flat curve
    ``k / S`` (every token equally important) instead of a division by zero.
    """
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [num_layers, num_tokens] with tokens, got {tuple(scores.shape)}")
    scores = scores.detach().to(torch.float64)
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError("importance scores must be finite and non-negative")
    ordered = scores.sort(dim=1, descending=True).values
    totals = ordered.sum(dim=1, keepdim=True)
    flat = torch.full_like(ordered, 1.0 / ordered.shape[1])
    shares = torch.where(totals > 0, ordered / totals.clamp_min(torch.finfo(torch.float64).tiny), flat)
    curves = shares.cumsum(dim=1)
    curves[:, -1] = 1.0  # rounding must never leave the full prefix short of p = 1
    return curves


def prefix_counts(curves: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest ``k >= 1`` per layer with ``curve[k - 1] >= threshold`` (``[L]`` int64)."""
    # Cumulative float sums land a hair below exact shares (six 1/12 shares sum
    # to 0.4999...); the tolerance keeps equal shares equal.
    target = torch.full((curves.shape[0], 1), threshold - SHARE_TOLERANCE, dtype=curves.dtype, device=curves.device)
    return (torch.searchsorted(curves, target, side="left").squeeze(1) + 1).clamp(max=curves.shape[1])


def search_prefix_config(curves: torch.Tensor, budget: float) -> torch.Tensor:
    """Per-layer kept-token counts whose sum is ``round(budget * L * S)``.

    ``budget`` is the mean fraction of tokens kept per layer. The bisection on the
    threshold is capped and deterministic. Where several layers cross the target
    at the same threshold (ties, flat curves), the remaining tokens go to those
    layers in layer order, so the total is always exact.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    num_layers, num_tokens = curves.shape
    target = min(max(round(budget * num_layers * num_tokens), num_layers), num_layers * num_tokens)
    if target == num_layers * num_tokens:
        return torch.full((num_layers,), num_tokens, dtype=torch.int64)

    if target == num_layers:  # threshold 0 already keeps one token per layer
        return torch.ones(num_layers, dtype=torch.int64)

    # Invariant: total(low) < target <= total(high). Zero-share tokens are never
    # reached by a threshold, so the upper end starts at "everything kept".
    low, high = 0.0, 1.0
    low_counts = prefix_counts(curves, low)
    high_counts = torch.full((num_layers,), num_tokens, dtype=torch.int64, device=curves.device)
    for _ in range(MAX_SEARCH_ITERATIONS):
        middle = (low + high) / 2
        counts = prefix_counts(curves, middle)
        total = int(counts.sum())
        if total == target:
            return counts.cpu()
        if total < target:
            low, low_counts = middle, counts
        else:
            high, high_counts = middle, counts
    # Several layers cross at the same threshold (ties, flat curves): hand out
    # the remaining tokens between the bracket's two configurations in layer order.
    counts = low_counts.cpu().clone()
    missing = target - int(counts.sum())
    for layer, room in enumerate((high_counts.cpu() - counts).tolist()):
        step = min(missing, room)
        counts[layer] += step
        missing -= step
    return counts

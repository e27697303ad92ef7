"""Loss-aware allocation: share a budget across layers where compressing costs least.

Calibration measures, per layer, what compressing only that layer to a few keep
ratios costs the model's output (``costs[l, i]`` at ``ratios[i]``; keeping
everything costs nothing). Treating the layers' costs as additive, the allocation
minimises their sum subject to the mean ratio being the budget. On each layer's
lower convex hull that is solved exactly by handing out ratio in order of the
steepest cost decrease per unit of ratio, across all layers at once.
"""

from __future__ import annotations

from typing import Sequence

import torch

# How calibration shares a budget across layers: ``loss`` (this module, measured on the
# model's output) or ``attention`` (the paper's rule: every layer keeps the same share
# of its own attention mass, ``curves.search_prefix_config``).
CRITERIA = ("loss", "attention")


def lower_convex_hull(xs: Sequence[float], ys: Sequence[float]) -> list[tuple[float, float]]:
    """The lower convex hull of points with increasing ``xs``, from the first point to the last."""
    hull: list[tuple[float, float]] = []
    for point in zip(xs, ys):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            # Drop the middle point unless the turn to ``point`` is strictly convex (bends upwards).
            if (x1 - x0) * (point[1] - y0) - (y1 - y0) * (point[0] - x0) > 0:
                break
            hull.pop()
        hull.append(point)
    return hull


def allocate_by_cost(ratios: Sequence[float], costs: torch.Tensor, budget: float) -> tuple[float, ...]:
    """Per-layer keep ratios averaging ``budget`` that minimise the summed (convexified) cost.

    ``ratios``: the measured keep ratios, strictly increasing in (0, 1), without 1.0
    (keeping every token costs 0 by definition and is added here). ``costs``:
    ``[L, len(ratios)]``, finite and non-negative. Every layer keeps at least
    ``ratios[0]``, so ``budget`` must lie in ``[ratios[0], 1]``. Segments of equal
    slope go to the earlier layer first, so the result is deterministic.
    """
    grid = [float(r) for r in ratios] + [1.0]
    if not grid[0] > 0 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"calibrated ratios must increase strictly within (0, 1), got {list(ratios)}")
    if costs.dim() != 2 or costs.shape[1] != len(ratios) or costs.shape[0] == 0:
        raise ValueError(f"costs must be [num_layers, {len(ratios)}], got {tuple(costs.shape)}")
    if not torch.isfinite(costs).all() or (costs < 0).any():
        raise ValueError("costs must be finite and non-negative")
    if not grid[0] <= budget <= 1.0:
        raise ValueError(f"budget {budget:g} is outside [{grid[0]:g}, 1]: no layer keeps less than the smallest calibrated ratio")
    num_layers = costs.shape[0]
    segments = []  # (slope, layer, width)
    for layer, row in enumerate(costs.double().tolist()):
        hull = lower_convex_hull(grid, row + [0.0])
        segments += [((y1 - y0) / (x1 - x0), layer, x1 - x0) for (x0, y0), (x1, y1) in zip(hull, hull[1:])]
    allocation = [grid[0]] * num_layers
    remaining = (budget - grid[0]) * num_layers
    # Within a layer the hull's slopes increase, so this order also takes each layer's segments in order.
    for _, layer, width in sorted(segments, key=lambda s: (s[0], s[1])):
        if remaining <= 0:
            break
        step = min(width, remaining)
        allocation[layer] += step
        remaining -= step
    return tuple(min(1.0, r) for r in allocation)

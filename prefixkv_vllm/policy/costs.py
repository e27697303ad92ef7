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

import numpy as np
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


def allocation_curves(ratios: Sequence[float], costs: torch.Tensor) -> tuple[tuple[tuple[float, float], ...], ...]:
    """Each layer's keep ratio as a function of the budget, under the allocation below.

    Handing out ratio in order of the steepest cost decrease, one hull segment at a
    time, raises only that segment's layer while the mean budget moves by its width
    over the layer count. So each layer's ratio is non-decreasing and piecewise linear
    in the budget, from ``(ratios[0], ratios[0])`` to ``(1, 1)``; it is returned as
    its knots ``(budget, ratio)``, linear between them (``ratio_at``). Segments of
    equal slope go to the earlier layer first, so the result is deterministic.
    ``ratios`` and ``costs`` as in ``allocate_by_cost``.
    """
    grid = [float(r) for r in ratios] + [1.0]
    if not grid[0] > 0 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"calibrated ratios must increase strictly within (0, 1), got {list(ratios)}")
    if costs.dim() != 2 or costs.shape[1] != len(ratios) or costs.shape[0] == 0:
        raise ValueError(f"costs must be [num_layers, {len(ratios)}], got {tuple(costs.shape)}")
    if not torch.isfinite(costs).all() or (costs < 0).any():
        raise ValueError("costs must be finite and non-negative")
    num_layers = costs.shape[0]
    segments = []  # (slope, layer, width)
    for layer, row in enumerate(costs.double().tolist()):
        hull = lower_convex_hull(grid, row + [0.0])
        segments += [((y1 - y0) / (x1 - x0), layer, x1 - x0) for (x0, y0), (x1, y1) in zip(hull, hull[1:])]
    budget, level = grid[0], [grid[0]] * num_layers
    knots = [[(grid[0], grid[0])] for _ in range(num_layers)]
    # Within a layer the hull's slopes increase, so this order also takes each layer's segments in order.
    for _, layer, width in sorted(segments, key=lambda s: (s[0], s[1])):
        if knots[layer][-1][0] != budget:
            knots[layer].append((budget, level[layer]))  # flat since its last segment
        budget += width / num_layers
        level[layer] += width
        knots[layer].append((budget, level[layer]))
    # Every layer ends at 1 when the budget does; rounding must not leave a knot past (1, 1).
    return tuple(tuple((b, min(1.0, r)) for b, r in layer if b < 1.0 - 1e-12) + ((1.0, 1.0),) for layer in knots)


def ratio_at(curve: Sequence[tuple[float, float]], budget: float) -> float:
    """A layer's ratio at ``budget`` on its curve (``allocation_curves``), which must cover it."""
    if not curve[0][0] - 1e-12 <= budget <= 1.0 + 1e-12:
        raise ValueError(f"budget {budget:g} is outside the curve's [{curve[0][0]:g}, 1]")
    budgets, ratios = zip(*curve)
    return float(np.interp(budget, budgets, ratios))


def allocate_by_cost(ratios: Sequence[float], costs: torch.Tensor, budget: float) -> tuple[float, ...]:
    """Per-layer keep ratios averaging ``budget`` that minimise the summed (convexified) cost.

    ``ratios``: the measured keep ratios, strictly increasing in (0, 1), without 1.0
    (keeping every token costs 0 by definition and is added here). ``costs``:
    ``[L, len(ratios)]``, finite and non-negative. Every layer keeps at least
    ``ratios[0]``, so ``budget`` must lie in ``[ratios[0], 1]``. The same allocation
    at every budget is ``allocation_curves``; this reads it at one.
    """
    curves = allocation_curves(ratios, costs)
    if not float(ratios[0]) <= budget <= 1.0:
        raise ValueError(f"budget {budget:g} is outside [{float(ratios[0]):g}, 1]: no layer keeps less than the smallest calibrated ratio")
    return tuple(ratio_at(curve, budget) for curve in curves)

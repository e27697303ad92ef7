"""Loss-aware allocation: the budget goes where compressing costs least."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixkv_vllm.policy.costs import allocate_by_cost, allocation_curves, lower_convex_hull, ratio_at

RATIOS = (0.05, 0.1, 0.2, 0.4, 0.7)


def hull_cost(ratios, row, r):
    """A layer's convexified cost at ratio ``r``: its lower hull, interpolated."""
    hull = lower_convex_hull(list(ratios) + [1.0], list(row) + [0.0])
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if x0 <= r <= x1 + 1e-12:
            return y0 + (y1 - y0) * (r - x0) / (x1 - x0)
    raise AssertionError(f"{r} outside the hull")


def test_hull_drops_points_above_the_chord():
    assert lower_convex_hull([0, 1, 2, 3], [3, 2.5, 0.5, 0]) == [(0, 3), (2, 0.5), (3, 0)]
    assert lower_convex_hull([0, 1, 2], [2, 1, 0]) == [(0, 2), (2, 0)]  # collinear: one segment


def test_costly_layer_gets_the_budget():
    costs = torch.tensor([[0.0] * 5, [1.0, 0.8, 0.5, 0.2, 0.1]])
    assert allocate_by_cost(RATIOS, costs, 0.3) == pytest.approx((0.05, 0.55))


def test_equal_layers_share_in_layer_order():
    costs = torch.tensor([[1.0, 0.5, 0.3, 0.1, 0.05]] * 3)
    allocation = allocate_by_cost(RATIOS, costs, 0.2)
    assert sum(allocation) / 3 == pytest.approx(0.2)
    assert list(allocation) == sorted(allocation, reverse=True)


@given(st.integers(0, 2**31 - 1), st.floats(0.05, 1.0))
@settings(max_examples=40, deadline=None)
def test_mean_is_the_budget_and_two_layers_are_optimal(seed, budget):
    costs = torch.rand(2, len(RATIOS), generator=torch.Generator().manual_seed(seed))
    allocation = allocate_by_cost(RATIOS, costs, budget)
    assert sum(allocation) / 2 == pytest.approx(budget)
    assert all(RATIOS[0] - 1e-12 <= r <= 1.0 for r in allocation)
    chosen = sum(hull_cost(RATIOS, row, r) for row, r in zip(costs.tolist(), allocation))
    # Brute force over the first layer's ratio; the second takes the rest of the budget.
    best = float("inf")
    for step in range(2001):
        first = RATIOS[0] + (1.0 - RATIOS[0]) * step / 2000
        second = 2 * budget - first
        if RATIOS[0] <= second <= 1.0:
            best = min(best, hull_cost(RATIOS, costs[0].tolist(), first) + hull_cost(RATIOS, costs[1].tolist(), second))
    assert chosen <= best + 1e-9


def greedy_reference(ratios, costs, budget):
    """The allocation at one budget, handed out segment by segment (what the curves must reproduce)."""
    grid = list(ratios) + [1.0]
    segments = []
    for layer, row in enumerate(costs.double().tolist()):
        hull = lower_convex_hull(grid, row + [0.0])
        segments += [((y1 - y0) / (x1 - x0), layer, x1 - x0) for (x0, y0), (x1, y1) in zip(hull, hull[1:])]
    allocation, remaining = [grid[0]] * costs.shape[0], (budget - grid[0]) * costs.shape[0]
    for _, layer, width in sorted(segments):
        step = min(width, max(0.0, remaining))
        allocation[layer] += step
        remaining -= step
    return allocation


@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
@settings(max_examples=40, deadline=None)
def test_curves_are_the_allocation_at_every_budget(seed, num_layers):
    generator = torch.Generator().manual_seed(seed)
    costs = torch.rand(num_layers, len(RATIOS), generator=generator)
    costs[0] = costs[-1]  # a tie, which goes to the earlier layer
    curves = allocation_curves(RATIOS, costs)
    for curve in curves:
        assert curve[0] == (RATIOS[0], RATIOS[0]) and curve[-1] == (1.0, 1.0)
        assert all(b0 < b1 and r0 <= r1 for (b0, r0), (b1, r1) in zip(curve, curve[1:]))  # non-decreasing
    for budget in [RATIOS[0], 1.0, *torch.rand(8, generator=generator).mul(1 - RATIOS[0]).add(RATIOS[0]).tolist()]:
        on_curves = [ratio_at(curve, budget) for curve in curves]
        assert on_curves == pytest.approx(greedy_reference(RATIOS, costs, budget), abs=1e-12)
        assert sum(on_curves) / num_layers == pytest.approx(budget, abs=1e-12)
        assert allocate_by_cost(RATIOS, costs, budget) == tuple(on_curves)


@pytest.mark.parametrize(
    "ratios, costs, budget, message",
    [
        ((0.1, 0.1), torch.zeros(1, 2), 0.5, "increase strictly"),
        ((0.1, 1.0), torch.zeros(1, 2), 0.5, "increase strictly"),
        (RATIOS, torch.zeros(1, 4), 0.5, "costs must be"),
        (RATIOS, -torch.ones(1, 5), 0.5, "non-negative"),
        (RATIOS, torch.zeros(1, 5), 0.01, "smallest calibrated ratio"),
    ],
)
def test_rejects(ratios, costs, budget, message):
    with pytest.raises(ValueError, match=message):
        allocate_by_cost(ratios, costs, budget)

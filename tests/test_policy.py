"""The policy layer: curves, the prefix search, selection, scorers, profiles."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixkv_vllm.policy import (
    MeanScorer,
    Profile,
    ProfileError,
    Protection,
    RawScorer,
    RecencyScorer,
    SnapKVScorer,
    WindowScorer,
    allocate_by_cost,
    average_keep_ratios,
    importance_curves,
    prefix_counts,
    search_prefix_config,
    select_tokens,
)
from prefixkv_vllm.policy.paged import request_keep_ratio
from prefixkv_vllm.policy.profile import VERSION, LayerCosts, ModelIdentity

from .settings import policy as build_policy


def brute_force_counts(scores: torch.Tensor, threshold: float) -> list[int]:
    counts = []
    for row in scores.double():
        ordered = sorted(row.tolist(), reverse=True)
        total = sum(ordered)
        shares = [v / total for v in ordered] if total > 0 else [1 / len(ordered)] * len(ordered)
        running, k = 0.0, len(ordered)
        for i, share in enumerate(shares):
            running += share
            if running >= threshold - 1e-12:
                k = i + 1
                break
        counts.append(max(1, k))
    return counts


score_matrices = st.builds(
    lambda layers, tokens, seed, kind: _make_scores(layers, tokens, seed, kind),
    st.integers(1, 6),
    st.integers(1, 80),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["random", "peaked", "flat", "zero", "ties"]),
)


def _make_scores(layers, tokens, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(layers, tokens, generator=gen)
    if kind == "peaked":
        return torch.rand(layers, tokens, generator=gen) ** 8
    if kind == "flat":
        return torch.ones(layers, tokens)
    if kind == "zero":
        return torch.zeros(layers, tokens)
    return torch.randint(0, 3, (layers, tokens), generator=gen).float()


class TestCurves:
    def test_curve_is_sorted_cumulative_share(self):
        curves = importance_curves(torch.tensor([[1.0, 3.0, 0.0, 4.0]]))
        assert torch.allclose(curves, torch.tensor([[0.5, 0.875, 1.0, 1.0]], dtype=torch.float64))

    def test_zero_scores_give_flat_curve(self):
        curves = importance_curves(torch.zeros(2, 4))
        assert torch.allclose(curves, torch.tensor([[0.25, 0.5, 0.75, 1.0]] * 2, dtype=torch.float64))

    @pytest.mark.parametrize("bad", [torch.tensor([[1.0, float("nan")]]), torch.tensor([[-1.0, 2.0]]), torch.ones(3)])
    def test_rejects_bad_scores(self, bad):
        with pytest.raises(ValueError):
            importance_curves(bad)

    @settings(max_examples=60, deadline=None)
    @given(score_matrices, st.floats(0.0, 1.0))
    def test_prefix_counts_match_brute_force(self, scores, threshold):
        counts = prefix_counts(importance_curves(scores), threshold)
        assert counts.tolist() == brute_force_counts(scores, threshold)

    def test_peaked_layer_keeps_fewer_tokens(self):
        scores = torch.ones(2, 100)
        scores[0, :5] = 1000.0  # layer 0 concentrates its attention
        counts = search_prefix_config(importance_curves(scores), 0.3)
        assert counts.sum() == 60 and counts[0] < counts[1]


class TestSearch:
    @settings(max_examples=80, deadline=None)
    @given(score_matrices, st.floats(0.001, 1.0))
    def test_total_is_exact_and_counts_valid(self, scores, budget):
        layers, tokens = scores.shape
        counts = search_prefix_config(importance_curves(scores), budget)
        target = min(max(round(budget * layers * tokens), layers), layers * tokens)
        assert int(counts.sum()) == target
        assert counts.min() >= 1 and counts.max() <= tokens

    @settings(max_examples=40, deadline=None)
    @given(score_matrices, st.floats(0.01, 0.99))
    def test_counts_are_a_common_threshold_configuration(self, scores, budget):
        # Every layer's count lies between the prefixes of one shared threshold
        # pair (p_low, p_high) that brackets the target: no layer is favoured.
        curves = importance_curves(scores)
        counts = search_prefix_config(curves, budget)
        shares_kept = curves.gather(1, (counts - 1).unsqueeze(1)).squeeze(1)
        shares_before = torch.where(
            counts > 1, curves.gather(1, (counts - 2).clamp(min=0).unsqueeze(1)).squeeze(1), torch.zeros_like(shares_kept)
        )
        assert shares_before.max() <= shares_kept.min() + 1e-9

    def test_budget_one_keeps_everything(self):
        counts = search_prefix_config(importance_curves(torch.rand(5, 33)), 1.0)
        assert counts.tolist() == [33] * 5

    def test_deterministic(self):
        curves = importance_curves(torch.randint(0, 4, (8, 64)).float())
        results = {tuple(search_prefix_config(curves, 0.37).tolist()) for _ in range(5)}
        assert len(results) == 1

    @pytest.mark.parametrize("budget", [0.0, -0.1, 1.01, float("nan")])
    def test_rejects_budget_outside_unit_interval(self, budget):
        with pytest.raises(ValueError, match="budget"):
            search_prefix_config(importance_curves(torch.rand(2, 4)), budget)

    def test_single_token_prompt(self):
        assert search_prefix_config(importance_curves(torch.rand(3, 1)), 0.2).tolist() == [1, 1, 1]


class TestSelection:
    def test_protected_tokens_always_kept(self):
        scores = torch.tensor([[0.0, 9.0, 8.0, 0.0, 7.0, 0.0]])
        kept = select_tokens(scores, 4, Protection(sink=1, recent=1))
        assert kept.tolist() == [[0, 1, 2, 5]]

    def test_ties_prefer_earlier_tokens(self):
        kept = select_tokens(torch.ones(1, 10), 4, Protection(sink=1, recent=1))
        assert kept.tolist() == [[0, 1, 2, 9]]

    @settings(max_examples=50, deadline=None)
    @given(st.integers(1, 4), st.integers(1, 60), st.integers(0, 3), st.integers(1, 4), st.data())
    def test_selection_sorted_unique_and_top(self, rows, length, sink, recent, data):
        protection = Protection(sink=sink, recent=recent)
        keep = data.draw(st.integers(protection.count(length), length))
        scores = torch.rand(rows, length)
        kept = select_tokens(scores, keep, protection)
        assert kept.shape == (rows, keep)
        for row, positions in zip(scores, kept):
            positions = positions.tolist()
            assert positions == sorted(set(positions))
            protected = set(torch.nonzero(protection.mask(length)).flatten().tolist())
            assert protected <= set(positions)
            rest = [p for p in positions if p not in protected]
            dropped = [p for p in range(length) if p not in positions]
            if rest and dropped:
                assert min(row[rest]) >= max(row[dropped])

    def test_keep_below_protected_is_an_error(self):
        with pytest.raises(ValueError):
            select_tokens(torch.rand(1, 10), 1, Protection(sink=2, recent=1))


class TestScorers:
    def test_mean_divides_by_observers(self):
        accumulated = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
        assert MeanScorer().scores(accumulated, 4).tolist() == [[1.0, 1.0, 1.0, 1.0]]
        assert RawScorer().scores(accumulated, 4).tolist() == [[4.0, 3.0, 2.0, 1.0]]

    def test_window_queries_and_head_averaging(self):
        scorer = WindowScorer(window=8)
        assert scorer.min_query_pos(100) == 92 and scorer.min_query_pos(5) == 0
        accumulated = torch.tensor([[8.0, 0.0], [0.0, 8.0]])
        assert scorer.scores(accumulated, 2).tolist() == [[2.0, 2.0]]
        assert WindowScorer(per_kv_head=True, window=8).scores(accumulated, 2).shape == (2, 2)

    def test_snapkv_keeps_a_span_together(self):
        # A five-token span of equal attention and two lone tokens that each take more.
        accumulated = torch.zeros(1, 64)
        accumulated[0, 20:25] = 1.0
        accumulated[0, [40, 50]] = 1.5
        protection = Protection(sink=1, recent=1)
        span = set(range(20, 25))

        def kept(scorer):
            return set(select_tokens(scorer.scores(accumulated, 64), 2 + 5, protection)[0].tolist())

        assert not span <= kept(WindowScorer())  # the lone tokens win two of the five places
        assert kept(SnapKVScorer()) == {0, 63} | span

    @given(st.integers(1, 40), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
    @settings(max_examples=30, deadline=None)
    def test_snapkv_kernel_one_is_the_window_scorer(self, length, heads, seed, per_kv_head):
        accumulated = torch.rand(heads, length, generator=torch.Generator().manual_seed(seed))
        window = WindowScorer(per_kv_head=per_kv_head, window=8).scores(accumulated, length)
        pooled = SnapKVScorer(per_kv_head=per_kv_head, window=8, kernel=1).scores(accumulated, length)
        torch.testing.assert_close(pooled, window, rtol=0, atol=0)

    def test_snapkv_averages_its_neighbours_and_keeps_the_length(self):
        scores = SnapKVScorer(window=1, kernel=3).scores(torch.tensor([[3.0, 0.0, 6.0, 0.0]]), 4)
        torch.testing.assert_close(scores, torch.tensor([[1.0, 3.0, 2.0, 2.0]]))
        with pytest.raises(ValueError, match="odd kernel"):
            SnapKVScorer(kernel=4)

    def test_snapkv_by_name(self):
        scorer = build_policy("uniform", 0.5, scorer="snapkv", window=16).scorer
        assert isinstance(scorer, SnapKVScorer) and scorer.window == 16 and scorer.min_query_pos(100) == 84

    def test_recency_needs_no_attention(self):
        scorer = RecencyScorer()
        assert not scorer.needs_attention
        assert scorer.scores(torch.zeros(3, 5), 5).argmax().item() == 4


class TestPolicies:
    def test_streaming_keeps_sink_and_recent(self):
        policy = build_policy("streaming", 0.5, sink=2)
        kept = policy.plan([torch.rand(3, 10)] * 2, 10)
        assert [k.tolist() for k in kept] == [[[0, 1, 7, 8, 9]]] * 2

    def test_uniform_budget_and_per_head(self):
        policy = build_policy("uniform", 0.25, scorer="mean", per_kv_head=True)
        kept = policy.plan([torch.rand(3, 40) for _ in range(4)], 40)
        assert all(k.shape == (3, 10) for k in kept)

    def test_prefixkv_online_hits_budget(self):
        policy = build_policy("prefixkv", 0.3, scorer="raw")
        accumulated = [torch.rand(3, 50) ** (i + 1) for i in range(6)]
        kept = policy.plan(accumulated, 50)
        assert sum(k.shape[1] for k in kept) == pytest.approx(0.3 * 50 * 6, abs=6)
        assert len({k.shape[1] for k in kept}) > 1

    def test_prefixkv_profile(self):
        profile = Profile(ModelIdentity("m", 2, 1, 4), "mean", {0.5: (0.75, 0.25)})
        policy = build_policy("prefixkv", 0.5, profile=profile)
        assert policy.keep_counts(100, 2).tolist() == [75, 25]
        with pytest.raises(ProfileError, match="no entry for budget 0.3"):
            build_policy("prefixkv", 0.3, profile=profile)

    def test_budget_one_keeps_all_tokens(self):
        for name in ("prefixkv", "uniform", "streaming"):
            kept = build_policy(name, 1.0).plan([torch.rand(3, 17)] * 3, 17)
            assert all(k.tolist() == [list(range(17))] for k in kept)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(name="h2o", budget=0.2), "unknown KV policy"),
            (dict(name="prefixkv", budget=0.0), r"\(0, 1\]"),
            (dict(name="prefixkv", budget=1.5), r"\(0, 1\]"),
            (dict(name="prefixkv", budget=0.2, scorer="max"), "unknown scorer"),
            (dict(name="uniform", budget=0.5, profile=Profile(ModelIdentity("m", 1, 1, 1), "mean", {0.5: (0.5,)})), "profile"),
        ],
    )
    def test_bad_configuration(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            build_policy(kwargs.pop("name"), kwargs.pop("budget"), **kwargs)

    def test_none_is_stock(self):
        assert build_policy("none", 1.0) is None


class TestProfile:
    def make(self):
        return Profile(
            ModelIdentity("SmolLM2", 3, 3, 64), "mean", {0.2: (0.4, 0.1, 0.1), 0.5: (0.8, 0.4, 0.3)}, {"samples": 4}
        )

    def test_round_trip(self, tmp_path):
        path = tmp_path / "profile.json"
        self.make().save(path)
        loaded = Profile.load(path)
        assert loaded == self.make()
        assert loaded.keep_ratios(0.2) == (0.4, 0.1, 0.1)

    def test_model_mismatch(self):
        with pytest.raises(ProfileError, match="profile is for SmolLM2"):
            self.make().check_model(tuple(range(30)), 3, 64)
        self.make().check_model((0, 1, 2), 3, 64)

    @pytest.mark.parametrize(
        "mutate, message",
        [
            (lambda d: d.update(format="other"), "not a PrefixKV profile"),
            (lambda d: d.update(version=3), "unsupported profile version 3 \\(this build reads 1 and 2\\)"),
            (lambda d: d.update(version=True), "unsupported profile version True"),
            (lambda d: d["model"].pop("num_layers"), "malformed"),
            (lambda d: d["model"].update(num_layers=0), "positive integer"),
            (lambda d: d["entries"][0].update(keep_ratios=[0.4, 0.1]), "2 ratios for 3 layers"),
            (lambda d: d["entries"][0].update(keep_ratios=[1.5, 0.1, -1.0]), "outside"),
            (lambda d: d["entries"][0].update(budget=0.3), "averages"),
            (lambda d: d["entries"][0].update(budget=0.0), "outside"),
            (lambda d: d["entries"].append(dict(d["entries"][0])), "twice"),
            (lambda d: d["entries"][0].update(keep_ratios="abc"), "malformed"),
            (lambda d: d.update(entries=[]), "no entries"),
        ],
    )
    def test_validation(self, tmp_path, mutate, message):
        data = self.make().to_json()
        mutate(data)
        path = tmp_path / "profile.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ProfileError, match=message):
            Profile.load(path)

    def make_loss(self):
        costs = LayerCosts((0.1, 0.3, 0.6), ((0.9, 0.4, 0.1), (0.05, 0.02, 0.01), (0.3, 0.2, 0.0)))
        entries = {0.3: allocate_by_cost(costs.ratios, torch.tensor(costs.kl_per_layer), 0.3)}
        return Profile(ModelIdentity("SmolLM2", 3, 3, 64), "snapkv", entries, {"criterion": "loss", "samples": 4}, costs)

    def test_costs_are_a_field_of_their_own(self, tmp_path):
        path = tmp_path / "profile.json"
        self.make_loss().save(path)
        data = json.loads(path.read_text())
        assert data["version"] == VERSION == 2
        assert data["costs"] == {"ratios": [0.1, 0.3, 0.6], "kl_per_layer": [[0.9, 0.4, 0.1], [0.05, 0.02, 0.01], [0.3, 0.2, 0.0]]}
        assert data["provenance"] == {"criterion": "loss", "samples": 4}
        loaded = Profile.load(path)
        assert loaded == self.make_loss()
        assert loaded.keep_ratios(0.5) == allocate_by_cost((0.1, 0.3, 0.6), torch.tensor(loaded.costs.kl_per_layer), 0.5)
        assert json.loads(json.dumps(self.make().to_json()))["costs"] is None and self.make().ratio_curves() is None

    def test_a_version_1_file_loads_as_its_version_2_conversion(self, tmp_path):
        # Version 1 kept a loss profile's costs under provenance, as loss_ratios and kl_per_layer.
        v2 = self.make_loss().to_json()
        v1 = {key: value for key, value in v2.items() if key != "costs"}
        v1["version"] = 1
        v1["provenance"] = {**v2["provenance"], "loss_ratios": v2["costs"]["ratios"], "kl_per_layer": v2["costs"]["kl_per_layer"]}
        (tmp_path / "v1.json").write_text(json.dumps(v1))
        old = Profile.load(tmp_path / "v1.json")
        old.save(tmp_path / "converted.json")
        converted = json.loads((tmp_path / "converted.json").read_text())
        assert converted == v2  # the costs moved out of provenance, nothing else changed
        new = Profile.load(tmp_path / "converted.json")
        assert old == new
        for budget in (0.1, 0.2, 0.3, 0.45, 0.8, 1.0):
            assert old.keep_ratios(budget) == new.keep_ratios(budget)
        assert old.ratio_curves() == new.ratio_curves() is not None
        # A version 1 attention profile has no costs; one that lost its ratios is malformed.
        (tmp_path / "v1.json").write_text(json.dumps({**self.make().to_json(), "version": 1}))
        assert Profile.load(tmp_path / "v1.json") == self.make()
        del v1["provenance"]["loss_ratios"]
        (tmp_path / "v1.json").write_text(json.dumps(v1))
        with pytest.raises(ProfileError, match="malformed profile.*loss_ratios"):
            Profile.load(tmp_path / "v1.json")

    @pytest.mark.parametrize(
        "mutate, message",
        [
            (lambda c: c["kl_per_layer"].pop(), "costs cover 2 layers, not 3"),
            (lambda c: c["kl_per_layer"][1].pop(), "one value per ratio \\(3\\)"),
            (lambda c: c.pop("ratios"), "malformed"),
            (lambda c: c.update(kl_per_layer="abc"), "malformed"),
        ],
    )
    def test_costs_validation(self, tmp_path, mutate, message):
        data = self.make_loss().to_json()
        mutate(data["costs"])
        (tmp_path / "profile.json").write_text(json.dumps(data))
        with pytest.raises(ProfileError, match=message):
            Profile.load(tmp_path / "profile.json")

    def test_unusable_costs_fail_when_read(self):
        unusable = dataclasses.replace(self.make_loss(), costs=LayerCosts((0.6, 0.3, 0.1), self.make_loss().costs.kl_per_layer))
        with pytest.raises(ProfileError, match="unusable costs: calibrated ratios must increase"):
            unusable.ratio_curves()
        with pytest.raises(ProfileError, match="unusable costs"):
            unusable.keep_ratios(0.5)

    def test_unreadable_files(self, tmp_path):
        with pytest.raises(ProfileError, match="cannot read"):
            Profile.load(tmp_path / "missing.json")
        (tmp_path / "bad.json").write_text("{not json")
        with pytest.raises(ProfileError, match="not valid JSON"):
            Profile.load(tmp_path / "bad.json")

    def test_average_keep_ratios(self):
        ratios = average_keep_ratios([[50, 10], [30, 30]], [100, 100])
        assert all(math.isclose(a, b) for a, b in zip(ratios, (0.4, 0.2)))


@pytest.mark.parametrize("request_budget", [0.05, 0.2, 0.35, 0.9, 1.0])
def test_request_keep_ratio_moves_the_mean_and_keeps_the_order(request_budget):
    layer_ratios = [0.78, 0.36, 0.05, 0.2, 0.11, 0.3]
    server_budget = sum(layer_ratios) / len(layer_ratios)
    moved = [request_keep_ratio(r, server_budget, request_budget) for r in layer_ratios]
    assert sum(moved) / len(moved) == pytest.approx(request_budget)
    assert all(0 < m <= 1 + 1e-12 for m in moved)
    pairs = [(i, j) for i in range(6) for j in range(6) if layer_ratios[i] <= layer_ratios[j]]
    assert all(moved[i] <= moved[j] + 1e-12 for i, j in pairs)  # the per-layer shape is kept
    assert request_keep_ratio(0.3, server_budget, server_budget) == pytest.approx(0.3)


def test_request_keep_ratio_on_loss_curves_is_the_allocation_at_the_request_budget():
    from prefixkv_vllm.policy.costs import allocate_by_cost, allocation_curves

    grid = (0.05, 0.1, 0.2, 0.4, 0.7)
    costs = torch.tensor([[1.0, 0.6, 0.3, 0.1, 0.02], [0.2, 0.15, 0.1, 0.05, 0.01], [3.0, 1.0, 0.2, 0.1, 0.05]])
    curves = allocation_curves(grid, costs)
    server = allocate_by_cost(grid, costs, 0.2)
    for request_budget in (0.05, 0.3, 0.5, 0.9, 1.0):
        moved = [request_keep_ratio(r, 0.2, request_budget, curve) for r, curve in zip(server, curves)]
        assert moved == pytest.approx(allocate_by_cost(grid, costs, request_budget))  # as if the server ran at it
    assert [request_keep_ratio(r, 0.2, 0.2, c) for r, c in zip(server, curves)] == list(server)  # exactly
    below = [request_keep_ratio(r, 0.2, 0.02, curve) for r, curve in zip(server, curves)]
    assert below == pytest.approx([0.02] * 3)  # below the measured range: the lowest allocation, shrunk

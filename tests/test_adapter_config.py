"""Plugin settings: parsing, validation, round trip through additional_config, tiers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from prefixkv_vllm.config import PrefixKVConfig, PrefixKVConfigError  # noqa: E402
from prefixkv_vllm.vllm_adapter.request_options import SchedulerBudgets, request_budget  # noqa: E402
from prefixkv_vllm.vllm_adapter.startup import _decode_interval, _tier_curves, _tier_means, _tiers  # noqa: E402


def test_defaults_are_stock():
    assert not PrefixKVConfig.from_additional_config({}).active
    assert not PrefixKVConfig.from_additional_config(None).active


def test_round_trip():
    config = PrefixKVConfig(policy="prefixkv", budget=0.3, scorer="mean", tiers=5).with_keep_ratios((0.5, 0.1))
    assert PrefixKVConfig.from_additional_config(config.to_additional_config()) == config
    curves = (((0.05, 0.05), (0.5, 0.9), (1.0, 1.0)), ((0.05, 0.05), (0.5, 0.1), (1.0, 1.0)))
    config = config.with_keep_ratios((0.5, 0.1), curves)
    assert PrefixKVConfig.from_additional_config(json.loads(json.dumps(config.to_additional_config()))) == config
    assert PrefixKVConfig.from_additional_config({"kv_policy": "uniform", "kv_budget": 1}).budget == 1.0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"kv_policy": "h2o"}, "unknown --kv-policy 'h2o'"),
        ({"kv_policy": "prefixkv", "kv_budget": 0}, r"--kv-budget must be a number in \(0, 1\]"),
        ({"kv_policy": "prefixkv", "kv_budget": "0.2"}, r"--kv-budget must be a number in \(0, 1\]"),
        ({"kv_policy": "prefixkv", "kv_budget": float("nan")}, r"--kv-budget must be a number in \(0, 1\]"),
        ({"kv_policy": "prefixkv", "kv_scorer": "max"}, "unknown --kv-scorer 'max'"),
        ({"kv_policy": "prefixkv", "kv_window": 0}, "--kv-window must be an integer >= 1"),
        ({"kv_policy": "prefixkv", "kv_recent": 0}, "--kv-recent must be an integer >= 1"),
        ({"kv_policy": "prefixkv", "kv_sink": True}, "--kv-sink must be an integer >= 0"),
        ({"kv_policy": "uniform", "kv_profile": "p.json"}, "--kv-policy uniform does not use one"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(PrefixKVConfigError, match=message):
        PrefixKVConfig.from_additional_config(settings)


def test_decode_interval_is_whole_blocks():
    config = PrefixKVConfig(policy="prefixkv", decode_interval=96)
    assert _decode_interval(config, 32, given=True) == 96
    with pytest.raises(PrefixKVConfigError, match="^--kv-decode-interval 96 must be a multiple of the block size 64$"):
        _decode_interval(config, 64, given=True)
    assert _decode_interval(config, 64, given=False) == 128  # the default, in tokens: rounded up to whole blocks
    # Without decode rounds the interval is unused, and never an error.
    assert _decode_interval(PrefixKVConfig(policy="prefixkv", decode="off", decode_interval=96), 64, given=True) == 128


def test_tiers_keep_the_mean_and_group_by_ratio():
    ratios = (0.9, 0.1, 0.5, 0.2, 0.3, 0.4)
    tiered = _tier_means(ratios, _tiers(ratios, 3))
    assert len(set(tiered)) == 3
    assert sum(tiered) == pytest.approx(sum(ratios))
    assert tiered[1] == tiered[3] == pytest.approx(0.15)  # the two lowest share a tier
    assert _tier_means(ratios, _tiers(ratios, 0)) == list(ratios)


def test_tiers_share_the_mean_of_their_layers_curves():
    curves = [((0.1, 0.1), (0.5, 0.3), (1.0, 1.0)), ((0.1, 0.1), (0.3, 0.5), (1.0, 1.0)), ((0.1, 0.1), (1.0, 1.0))]
    tiers = _tiers((0.3, 0.5, 0.2), 1)  # one tier of all three
    tiered = _tier_curves(curves, tiers)
    assert tiered[0] == tiered[1] == tiered[2]
    assert [b for b, _ in tiered[0]] == [0.1, 0.3, 0.5, 1.0]  # the union of the knots
    assert dict(tiered[0])[0.5] == pytest.approx((0.3 + (0.5 + 0.5 * 0.2 / 0.7) + (0.1 + 0.9 * 0.4 / 0.9)) / 3)


@pytest.mark.parametrize(
    "extra_args, budget",
    [
        (None, None),
        ({}, None),
        ({"other": 3}, None),
        ({"kv_budget": 0.1}, 0.1),
        ({"kv_budget": 1}, 1.0),
        # vLLM's own key (KV connectors) and other plugins' kv_* keys are not ours to judge.
        ({"kv_transfer_params": {"do_remote_prefill": True}}, None),
        ({"kv_transfer_params": None, "kv_other_plugin": "x", "kv_budget": 0.5}, 0.5),
    ],
)
def test_request_budget(extra_args, budget):
    assert request_budget(extra_args) == budget


@pytest.mark.parametrize(
    "extra_args, message",
    [
        ({"kv_budget": 0}, r"kv_budget must be a number in \(0, 1\], got 0"),
        ({"kv_budget": 1.5}, r"kv_budget must be a number in \(0, 1\], got 1.5"),
        ({"kv_budget": "0.5"}, r"got '0.5'"),
        ({"kv_budget": True}, r"got True"),
        ({"kv_budget": float("inf")}, r"got inf"),
    ],
)
def test_bad_request_options(extra_args, message):
    with pytest.raises(ValueError, match=message):
        request_budget(extra_args)


def test_scheduler_budgets_track_admitted_requests():
    budgets = SchedulerBudgets()
    budgets.admit("a", 0.5)
    budgets.admit("b", None)  # the server's budget: nothing to remember
    assert (budgets.get("a"), budgets.get("b"), len(budgets)) == (0.5, None, 1)
    budgets.release("a")
    assert budgets.get("a") is None and len(budgets) == 0


def test_other_kv_keys_in_additional_config_are_not_ours():
    shared = {"kv_policy": "uniform", "kv_budget": 0.5, "kv_offload_size": 8, "kv_transfer": {"x": 1}}
    assert PrefixKVConfig.from_additional_config(shared) == PrefixKVConfig(policy="uniform", budget=0.5)
    assert not PrefixKVConfig.from_additional_config({"kv_offload_size": 8}).active

"""Hybrid-attention models (Gemma 3 style): only the full-attention layers are compressed.

The unit tests need no engine. The end-to-end tests serve a small random-weight
Gemma 3 (``tiny_gemma3``: sliding-window and full-attention layers, the demo model's
tokenizer) with one shared server per configuration.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.core.kv_cache_utils import _get_kv_cache_groups_uniform_page_size  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

from prefixkv_vllm.policy.layers import describe_layer_kinds, full_attention_layers  # noqa: E402
from prefixkv_vllm.policy.paged import peak_live_blocks  # noqa: E402
from prefixkv_vllm.policy.profile import ModelIdentity, Profile, ProfileError  # noqa: E402
from prefixkv_vllm.vllm_adapter.admission import Admission  # noqa: E402
from prefixkv_vllm.vllm_adapter.config import PrefixKVConfig, PrefixKVConfigError  # noqa: E402
from prefixkv_vllm.vllm_adapter.kv_spec import PrefixKVAttentionSpec  # noqa: E402
from prefixkv_vllm.vllm_adapter.startup import layer_specs  # noqa: E402

GEMMA3_TYPES = ["sliding_attention"] * 5 + ["full_attention"]


# --- which layers are compressed ----------------------------------------------------


@pytest.mark.parametrize(
    "config, expected",
    [
        (SimpleNamespace(layer_types=GEMMA3_TYPES * 3, sliding_window=512), (5, 11, 17)),  # Gemma 3
        (SimpleNamespace(layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=128), (1, 3)),  # gpt-oss
        (SimpleNamespace(layer_types=["chunked_attention"] * 3 + ["full_attention"]), (3,)),  # Llama 4
        (SimpleNamespace(layer_types=["linear_attention"] * 3 + ["full_attention"]), (3,)),  # Qwen 3.5
        (SimpleNamespace(layer_types=["full_attention"] * 4, sliding_window=4096), (0, 1, 2, 3)),  # Qwen 2: window off
        (SimpleNamespace(), (0, 1, 2, 3)),  # Llama: no layer types, no window
        (SimpleNamespace(sliding_window=64), ()),  # Mistral style: every layer slides
        (SimpleNamespace(layer_types=["sliding_attention"] * 4, sliding_window=64), ()),
    ],
)
def test_full_attention_layers(config, expected):
    num_layers = len(getattr(config, "layer_types", [None] * 4))
    assert full_attention_layers(config, num_layers) == expected


def test_models_without_full_attention_are_described_in_a_few_words():
    assert describe_layer_kinds(SimpleNamespace(sliding_window=64), 4) == "every layer has a sliding window of 64 tokens"
    kinds = SimpleNamespace(layer_types=["sliding_attention"] * 3 + ["chunked_attention"])
    assert describe_layer_kinds(kinds, 4) == "layer types: 3 sliding_attention, 1 chunked_attention"


# --- the KV-cache specs the worker hands to vLLM ------------------------------------

BLOCK = 32


def attention_specs(layer_types):
    specs = {}
    for index, kind in enumerate(layer_types):
        common = dict(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32)
        name = f"model.layers.{index}.self_attn.attn"
        specs[name] = FullAttentionSpec(**common) if kind == "full_attention" else SlidingWindowSpec(**common, sliding_window=64)
    return specs


def hybrid_config(layers, ratios, **settings):
    return PrefixKVConfig(policy="prefixkv", budget=float(np.mean(ratios)), layers=layers, keep_ratios=ratios, **settings)


def test_only_full_attention_layers_get_the_prefixkv_spec():
    specs = attention_specs(["full_attention", "sliding_attention", "sliding_attention", "full_attention"])
    converted = layer_specs(specs, hybrid_config((0, 3), (0.3, 0.1)))
    assert [type(s).__name__ for s in converted.values()] == [
        "PrefixKVAttentionSpec", "SlidingWindowSpec", "SlidingWindowSpec", "PrefixKVAttentionSpec",
    ]  # fmt: skip
    assert converted["model.layers.1.self_attn.attn"] is specs["model.layers.1.self_attn.attn"]  # vLLM's own, untouched
    assert [converted[f"model.layers.{i}.self_attn.attn"].keep_ratio for i in (0, 3)] == [0.3, 0.1]


def test_start_up_and_worker_must_agree_on_the_compressed_layers():
    specs = attention_specs(["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    with pytest.raises(PrefixKVConfigError, match=r"compress the full-attention layers \[0, 3\], but the model built full attention in layers \[1, 3\]"):
        layer_specs(specs, hybrid_config((0, 3), (0.3, 0.1)))


@pytest.mark.parametrize("first", ["full_attention", "sliding_attention"])
def test_vllm_groups_prefixkv_and_sliding_layers_apart(first):
    # vLLM's grouping probes merge() across kinds, in layer order: a full layer first
    # asks PrefixKVAttentionSpec.merge to absorb sliding-window specs.
    other = "sliding_attention" if first == "full_attention" else "full_attention"
    types = [first, other, other, first, other, other]
    specs = attention_specs(types)
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    ratios = (0.3, 0.1) if len(full) == 2 else (0.3, 0.1, 0.2, 0.2)
    groups = _get_kv_cache_groups_uniform_page_size(layer_specs(specs, hybrid_config(full, ratios)))
    kinds = sorted((type(g.kv_cache_spec).__name__, len(g.layer_names)) for g in groups)
    assert kinds == sorted([("PrefixKVAttentionSpec", 1)] * len(full) + [("SlidingWindowSpec", 1)] * (6 - len(full)))


def test_profiles_name_their_compressed_layers():
    profile = Profile(ModelIdentity("gemma", 3, 1, 256, layers=(5, 11, 17)), "window", {0.2: (0.3, 0.1, 0.2)})
    profile.check_model((5, 11, 17), 1, 256)
    assert Profile.from_json(profile.to_json()) == profile
    assert profile.to_json()["model"]["layers"] == [5, 11, 17]
    with pytest.raises(ProfileError, match=r"full attention in layers \[5, 11, 17\], but the model has it in layers \[1, 3, 5\]"):
        profile.check_model((1, 3, 5), 1, 256)
    with pytest.raises(ProfileError, match="3 layer indices for 2 layers"):
        ModelIdentity("gemma", 2, 1, 256, layers=(5, 11, 17))
    # Profiles written before hybrid support compress every layer.
    old = profile.to_json()
    old["model"].pop("layers")
    old["model"]["num_layers"] = 3
    assert Profile.from_json(old).model.layers == (0, 1, 2)


# --- admission with vLLM's sliding-window groups beside PrefixKV's -----------------

WINDOW = 64


def admission_with_sliding_groups(running, ratios=(0.25, 0.25), sliding_groups=2):
    compressed = [
        PrefixKVAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32, keep_ratio=r, budget=0.25, decode="fifo")
        for r in ratios
    ]
    sliding = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32, sliding_window=WINDOW)
    specs = compressed + [sliding] * sliding_groups
    # vLLM's own rule for what a sliding-window group has freed.
    manager = SimpleNamespace(get_num_skipped_tokens=lambda c: SlidingWindowManager.get_num_skipped_tokens(
        SimpleNamespace(sliding_window=WINDOW, extra_retained_tokens=0), c))
    managers = [None] * len(compressed) + [manager] * sliding_groups
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), max_in_flight_tokens=256, max_concurrent_batches=1)
    return Admission(vllm_config, SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs]), managers, running)


def request(name, prompt, max_tokens, computed=0):
    return SimpleNamespace(request_id=name, num_prompt_tokens=prompt, max_tokens=max_tokens, num_computed_tokens=computed)


def test_admission_counts_sliding_groups_by_vllms_window_rule():
    decoding = request("a", 1000, 500, computed=1100)
    admission = admission_with_sliding_groups([decoding])
    # Past its prompt a sliding group holds the window and the block being written:
    # (1100 - 63) // 32 = 32 blocks skipped of ceil(1100 / 32) = 35.
    assert admission._other_blocks(1100, 1100) == 2 * (35 - 32)
    # Its decode peak is vLLM's admission bound with one token in flight: ceil(64 / 32) + 1.
    sliding_peak = min(math.ceil(1500 / BLOCK), math.ceil(WINDOW / BLOCK) + 1)
    assert admission.peak(decoding) == peak_live_blocks(1000, 1500, np.array([0.25, 0.25]), admission.layout, prefill=False) + 2 * sliding_peak
    # A newcomer's prompt is held whole by every group while it prefills, bounded by the chunk in flight.
    newcomer = request("b", 200, 10)
    sliding_prefill = min(math.ceil(210 / BLOCK), math.ceil((WINDOW - 1 + 256) / BLOCK) + 1)
    assert admission.peak(newcomer) == peak_live_blocks(200, 210, np.array([0.25, 0.25]), admission.layout) + 2 * sliding_prefill


def test_sliding_groups_do_not_inflate_a_running_requests_growth():
    # Deep into decoding, a request's sliding groups hold their window and do not grow.
    decoding = request("a", 1000, 200, computed=1150)
    with_sliding = admission_with_sliding_groups([decoding])
    without = admission_with_sliding_groups([decoding], sliding_groups=0)
    assert with_sliding.held(decoding) == without.held(decoding) + 2 * (math.ceil(1150 / BLOCK) - (1150 - WINDOW + 1) // BLOCK)
    assert with_sliding.peak(decoding) - with_sliding.held(decoding) == without.peak(decoding) - without.held(decoding)

"""Hybrid-attention models (Gemma 3 style): only the full-attention layers are compressed.

The unit tests need no engine. The end-to-end tests serve a small random-weight
Gemma 3 (``tiny_gemma3``: sliding-window and full-attention layers, the demo model's
tokenizer) with one shared server per configuration.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch

pytest.importorskip("vllm")

from vllm.model_executor.models.utils import extract_layer_index  # noqa: E402
from vllm.v1.core.kv_cache_utils import _get_kv_cache_groups_uniform_page_size  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

from prefixkv_vllm.config import PrefixKVConfig, PrefixKVConfigError  # noqa: E402
from prefixkv_vllm.policy.costs import allocate_by_cost  # noqa: E402
from prefixkv_vllm.policy.layers import describe_layer_kinds, full_attention_layers  # noqa: E402
from prefixkv_vllm.policy.paged import peak_live_blocks  # noqa: E402
from prefixkv_vllm.policy.profile import LayerCosts, ModelIdentity, Profile, ProfileError  # noqa: E402
from prefixkv_vllm.vllm_adapter.admission import Admission
from prefixkv_vllm.vllm_adapter.kv_spec import PrefixKVAttentionSpec  # noqa: E402
from prefixkv_vllm.vllm_adapter.request_options import SchedulerBudgets  # noqa: E402
from prefixkv_vllm.vllm_adapter.startup import layer_specs  # noqa: E402

from .random_models import demo_tokenizer_into, save_random_model  # noqa: E402
from .vllm_server import serve_together, usage_while_decoding  # noqa: E402

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
    converted = layer_specs(specs, hybrid_config((0, 3), (0.3, 0.1)), prefix_caching=False, stage=range(4))
    assert [type(s).__name__ for s in converted.values()] == [
        "PrefixKVAttentionSpec", "SlidingWindowSpec", "SlidingWindowSpec", "PrefixKVAttentionSpec",
    ]  # fmt: skip
    assert converted["model.layers.1.self_attn.attn"] is specs["model.layers.1.self_attn.attn"]  # vLLM's own, untouched
    assert [converted[f"model.layers.{i}.self_attn.attn"].keep_ratio for i in (0, 3)] == [0.3, 0.1]


def test_a_loss_profile_gives_each_layer_its_curve_for_request_budgets():
    # The scheduler (manager, admission) and the worker (backend) read a request's ratio from the spec.
    costs = torch.tensor([[1.0, 0.5, 0.2], [0.1, 0.05, 0.01]], dtype=torch.float64)
    profile = Profile(ModelIdentity("m", 2, 1, 64, layers=(0, 3)), "snapkv", {0.3: allocate_by_cost((0.1, 0.3, 0.6), costs, 0.3)},
                      {"criterion": "loss"}, LayerCosts((0.1, 0.3, 0.6), costs.tolist()))  # fmt: skip
    config = hybrid_config((0, 3), profile.keep_ratios(0.3)).with_keep_ratios(profile.keep_ratios(0.3), profile.ratio_curves())
    specs = attention_specs(["full_attention", "sliding_attention", "sliding_attention", "full_attention"])
    converted = layer_specs(specs, config, prefix_caching=False, stage=range(4))
    compressed = [converted[f"model.layers.{i}.self_attn.attn"] for i in (0, 3)]
    assert [spec.request_ratio(0.5) for spec in compressed] == pytest.approx(profile.keep_ratios(0.5))
    assert [spec.request_ratio(0.3) for spec in compressed] == list(profile.keep_ratios(0.3))
    without = layer_specs(specs, hybrid_config((0, 3), profile.keep_ratios(0.3)), prefix_caching=False, stage=range(4))
    assert without["model.layers.0.self_attn.attn"].ratio_curve == ()  # rescaled, as before


def test_start_up_and_worker_must_agree_on_the_compressed_layers():
    specs = attention_specs(["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    with pytest.raises(PrefixKVConfigError, match=r"compress the full-attention layers \[0, 3\] of layers 0-3, but the model built full attention in layers \[1, 3\]"):
        layer_specs(specs, hybrid_config((0, 3), (0.3, 0.1)), prefix_caching=False, stage=range(4))


def test_a_pipeline_stage_converts_its_own_layers_at_their_ratios():
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    config = hybrid_config((0, 3), (0.3, 0.1))
    second = {name: spec for name, spec in attention_specs(types).items() if extract_layer_index(name) >= 2}
    converted = layer_specs(second, config, prefix_caching=False, stage=range(2, 4))
    assert sorted(converted) == sorted(second)
    assert converted["model.layers.3.self_attn.attn"].keep_ratio == 0.1
    first = {name: spec for name, spec in attention_specs(types).items() if extract_layer_index(name) < 2}
    with pytest.raises(PrefixKVConfigError, match=r"compress the full-attention layers \[3\] of layers 2-3, but the model built full attention in layers \[0\]"):
        layer_specs(first, config, prefix_caching=False, stage=range(2, 4))


@pytest.mark.parametrize("first", ["full_attention", "sliding_attention"])
def test_vllm_groups_prefixkv_and_sliding_layers_apart(first):
    # vLLM's grouping probes merge() across kinds, in layer order: a full layer first
    # asks PrefixKVAttentionSpec.merge to absorb sliding-window specs.
    other = "sliding_attention" if first == "full_attention" else "full_attention"
    types = [first, other, other, first, other, other]
    specs = attention_specs(types)
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    ratios = (0.3, 0.1) if len(full) == 2 else (0.3, 0.1, 0.2, 0.2)
    groups = _get_kv_cache_groups_uniform_page_size(layer_specs(specs, hybrid_config(full, ratios), prefix_caching=False, stage=range(6)))
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
        PrefixKVAttentionSpec(
            block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32, keep_ratio=r, sink=1, recent=1, budget=0.25,
            ratio_curve=(), decode="fifo", interval=32, prefix_caching=False,
        )
        for r in ratios
    ]
    sliding = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32, sliding_window=WINDOW)
    specs = compressed + [sliding] * sliding_groups
    # vLLM's own rule for what a sliding-window group has freed.
    manager = SimpleNamespace(get_num_skipped_tokens=lambda c: SlidingWindowManager.get_num_skipped_tokens(
        SimpleNamespace(sliding_window=WINDOW, extra_retained_tokens=0), c))
    managers = [None] * len(compressed) + [manager] * sliding_groups
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), max_in_flight_tokens=256, max_concurrent_batches=1)
    groups = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs])
    return Admission(vllm_config, groups, managers, lambda: running, SchedulerBudgets())


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


# --- end to end: `vllm serve` on a small random-weight Gemma 3 ---------------------

TINY_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2  # full attention in layers 2 and 5
TINY_WINDOW = 64
TINY_RATIOS = (0.3, 0.1)  # a profile: per-layer ratios without start-up calibration
# Pools of the same bytes: stock groups two layers per block (2 full + 2 x 2 sliding
# layers), prefixkv one (one group per compressed layer, so one per sliding layer too).
STOCK_BLOCKS, COMPRESSED_BLOCKS = 160, 320
SHARED_ARGS = ("--max-model-len", "1536", "--max-num-batched-tokens", "256", "--max-num-seqs", "16")


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A 6-layer Gemma 3 with random weights and the demo model's tokenizer, in fp32."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = tmp_path_factory.mktemp("tiny-gemma3")
    demo_config = demo_tokenizer_into(path)
    config = Gemma3TextConfig(
        vocab_size=demo_config["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=len(TINY_TYPES),
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, layer_types=TINY_TYPES, sliding_window=TINY_WINDOW,
        # As in Gemma, queries are scaled by query_pre_attn_scalar ** -0.5, not by head_dim ** -0.5.
        query_pre_attn_scalar=48, max_position_embeddings=4096, bos_token_id=demo_config["bos_token_id"],
        eos_token_id=demo_config["eos_token_id"], pad_token_id=demo_config.get("pad_token_id"), tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
    )  # fmt: skip
    save_random_model(Gemma3ForCausalLM, config, path)
    return path


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    profile = Profile(ModelIdentity("tiny-gemma3", 2, 1, 64, layers=(2, 5)), "window", {0.2: TINY_RATIOS})
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    profile.save(path)
    return path


@pytest.fixture(scope="module")
def servers(tiny_gemma3, log_dir, profile_path):
    # The compressed server keeps vLLM's own admission, so that a burst preempts.
    args = ("--kv-policy", "prefixkv", "--kv-budget", "0.2", "--kv-profile", str(profile_path), "--kv-admission", "stock")
    configs = {
        "stock": ((*SHARED_ARGS, "--num-gpu-blocks-override", str(STOCK_BLOCKS)), {"VLLM_PLUGINS": ""}),
        "compressed": ((*SHARED_ARGS, *args, "--num-gpu-blocks-override", str(COMPRESSED_BLOCKS)), None),
    }
    with serve_together(str(tiny_gemma3), configs, log_dir=log_dir) as started:
        yield started


@pytest.fixture(scope="module")
def stock(servers):
    return servers["stock"]


@pytest.fixture(scope="module")
def compressed(servers):
    return servers["compressed"]


def completion(server, prompt: list[int], max_tokens: int, **extra) -> tuple[list[str], list[float]]:
    """Greedy tokens and their logprobs."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0, **extra}
    response = requests.post(f"{server.base_url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    logprobs = response.json()["choices"][0]["logprobs"]
    return logprobs["tokens"], logprobs["token_logprobs"]


def token_prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40000, size=length).tolist()


# Prompts past the sliding window, and past several blocks of compression.
PROMPT_LENGTHS = (300, 1000)


def test_start_up_compresses_the_full_attention_layers_only(compressed):
    log = compressed.log()
    assert "PrefixKV: 2 compressed layers run prefixkv_vllm.vllm_adapter.backends.cpu_attn.PrefixKVCPUBackend" in log
    line = next(line for line in log.splitlines() if "keep ratios per layer" in line)
    assert "compressed: the 2 full-attention layers 2 5 of 6 (the other 4 keep vLLM's own KV cache)" in line
    assert "keep ratios per layer: 0.30 0.10;" in line


def test_request_budget_one_reproduces_stock_greedy_tokens(stock, compressed):
    moved = 0.0
    for seed, length in enumerate(PROMPT_LENGTHS):
        prompt = token_prompt(length, seed)
        tokens, logprobs = completion(stock, prompt, 24)
        whole_tokens, whole_logprobs = completion(compressed, prompt, 24, vllm_xargs={"kv_budget": 1.0})
        assert whole_tokens == tokens, length
        assert whole_logprobs == pytest.approx(logprobs, abs=1e-5), length
        _, compressed_logprobs = completion(compressed, prompt, 24)
        moved = max(moved, max(abs(a - b) for a, b in zip(compressed_logprobs, logprobs)))
    assert moved > 1e-3  # the server's own budget does change what the model computes


def held_pages(prompt_len: int, computed: int, ratios) -> tuple[int, int]:
    """Layer pages (one layer's block) one request holds: (full-attention layers, sliding layers), by the block arithmetic."""
    from prefixkv_vllm.config import PrefixKVConfig as defaults
    from prefixkv_vllm.policy.paged import PagedLayout, live_blocks

    layout = PagedLayout(BLOCK, defaults.sink, defaults.recent, "fifo", defaults.decode_interval, prefix_caching=True)
    allocated = math.ceil((computed + 1) / BLOCK)  # the step's new token has its slot
    full = sum(allocated - live_blocks(prompt_len, computed, r, layout)[0] for r in ratios)
    # vLLM's own rule for the sliding-window layers, the same in both servers.
    skipped = SlidingWindowManager.get_num_skipped_tokens(SimpleNamespace(sliding_window=TINY_WINDOW, extra_retained_tokens=0), computed)
    return full, TINY_TYPES.count("sliding_attention") * (allocated - skipped // BLOCK)


USAGE_PROMPTS = (300, 1000)


@pytest.mark.parametrize("length", USAGE_PROMPTS)
def test_full_attention_usage_falls_by_the_block_arithmetic_and_sliding_layers_stay_stock(stock, compressed, length):
    prompt = token_prompt(length, seed=length)
    for computed, usage in usage_while_decoding(stock, prompt):
        full, sliding = held_pages(length, computed, (1.0, 1.0))
        # Stock vLLM puts two layers in each block, PrefixKV one (the same bytes per pool).
        assert usage == pytest.approx((full + sliding) / 2 / (STOCK_BLOCKS - 1), abs=1e-6), computed
    for computed, usage in usage_while_decoding(compressed, prompt):
        full, sliding = held_pages(length, computed, TINY_RATIOS)
        stock_full, stock_sliding = held_pages(length, computed, (1.0, 1.0))
        assert sliding == stock_sliding and full < stock_full
        assert usage == pytest.approx((full + sliding) / (COMPRESSED_BLOCKS - 1), abs=1e-6), computed
    assert compressed.metric("vllm:kv_cache_usage_perc") == 0.0


def test_preemption_and_aborts_leave_no_blocks_behind(compressed):
    preempted_before = compressed.metric("vllm:num_preemptions_total")
    # Short prompts admitted together, growing to about 460 blocks of the pool's 320: vLLM
    # preempts. One request carries them all, so they reach the engine at once (sent from
    # 16 threads, some had finished before the last arrived, and none was preempted: seen in CI).
    prompts = [token_prompt(90 + 7 * i, seed=100 + i) for i in range(16)]
    body = {"model": "demo", "prompt": prompts, "max_tokens": 320, "temperature": 0, "ignore_eos": True}
    burst = []
    thread = threading.Thread(target=lambda: burst.append(requests.post(f"{compressed.base_url}/v1/completions", json=body, timeout=600)))
    thread.start()
    # Two streams closed early abort their requests mid-decode.
    for prompt in prompts[:2]:
        stream = {"model": "demo", "prompt": prompt, "max_tokens": 300, "ignore_eos": True, "stream": True}
        with requests.post(f"{compressed.base_url}/v1/completions", json=stream, stream=True, timeout=600) as response:
            for index, _ in enumerate(response.iter_lines()):
                if index > 20:
                    break
    thread.join()
    burst[0].raise_for_status()
    assert [choice["finish_reason"] for choice in burst[0].json()["choices"]] == ["length"] * len(prompts)
    assert burst[0].json()["usage"]["completion_tokens"] == 320 * len(prompts)
    assert compressed.metric("vllm:num_preemptions_total") > preempted_before, "the burst did not preempt; make it heavier"
    assert compressed.metric("vllm:kv_cache_usage_perc") == 0.0

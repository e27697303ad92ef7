"""End to end in the dtypes CPU users serve with: bf16 models, and fp8 KV caches.

vLLM runs bf16 attention on its 'amx' kernel where the CPU has AMX and on 'vec'
elsewhere; fp8 KV caches need AVX-512. Each case checks, against stock vLLM in the same
dtypes: the kernel PrefixKV read, that a request at budget 1 decodes stock's greedy
tokens, and that KV usage while decoding is what the block arithmetic says.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("vllm")

from prefixkv_vllm.config import PrefixKVConfig  # noqa: E402
from prefixkv_vllm.policy import Profile  # noqa: E402
from prefixkv_vllm.tools.demo_model import demo_model_path  # noqa: E402

from .cpu_features import HAS_AMX, needs_avx512  # noqa: E402
from .settings import DEFAULT_PROFILE  # noqa: E402
from .vllm_server import CHAT_PROMPTS, held_pages, serve_together, usage_while_decoding  # noqa: E402

BLOCK = 32  # tests/vllm_server.py's --block-size
# Pools of about the same tokens: stock puts all 30 layers in one block, PrefixKV one layer.
STOCK_BLOCKS, COMPRESSED_BLOCKS = 200, 6000
SETTINGS = {
    "bf16": ("--dtype", "bfloat16"),
    "bf16-fp8": ("--dtype", "bfloat16", "--kv-cache-dtype", "fp8"),
}


@pytest.fixture(scope="module", params=[pytest.param("bf16"), pytest.param("bf16-fp8", marks=needs_avx512)])
def servers(request, tmp_path_factory):
    model, log_dir, settings = str(demo_model_path()), tmp_path_factory.mktemp("vllm-logs"), SETTINGS[request.param]
    blocks = ("--max-model-len", "4096", "--num-gpu-blocks-override")  # a 6,400-token pool holds 4096
    configs = {
        "stock": ((*settings, *blocks, str(STOCK_BLOCKS)), {"VLLM_PLUGINS": ""}),
        "compressed": ((*settings, *blocks, str(COMPRESSED_BLOCKS), "--kv-policy", "prefixkv", "--kv-profile", str(DEFAULT_PROFILE)), None),
    }
    with serve_together(model, configs, log_dir=log_dir) as started:
        yield request.param, started["stock"], started["compressed"]


def greedy_tokens(server, prompt: str, **extra) -> list[str]:
    return [t["token"] for t in server.chat(prompt, logprobs=True, **extra)["choices"][0]["logprobs"]["content"]]


def test_the_log_names_the_kernel_and_cache_read(servers):
    name, _, compressed = servers
    kernel = "amx" if HAS_AMX else "vec"  # vLLM's choice for a bf16 model with 64-wide heads
    cache = "fp8" if name.endswith("fp8") else "auto"
    assert f"vLLM's CPU attention runs the '{kernel}' kernel on a {cache} KV cache" in compressed.log()


def test_request_budget_one_reproduces_stock_greedy_tokens(servers):
    _, stock, compressed = servers
    differs_at_server_budget = 0
    for prompt in CHAT_PROMPTS:
        expected = greedy_tokens(stock, prompt)
        assert greedy_tokens(compressed, prompt, vllm_xargs={"kv_budget": 1.0}) == expected, prompt[:60]
        differs_at_server_budget += greedy_tokens(compressed, prompt) != expected
    assert differs_at_server_budget > 0  # the server's own budget does change answers


def test_kv_usage_while_decoding_follows_the_block_arithmetic(servers):
    _, stock, compressed = servers
    length = 1000
    prompt = np.random.default_rng(length).integers(100, 40000, size=length).tolist()
    ratios = Profile.load(DEFAULT_PROFILE).keep_ratios(PrefixKVConfig.budget)
    for computed, usage in usage_while_decoding(stock, prompt):
        assert usage == pytest.approx(math.ceil((computed + 1) / BLOCK) / (STOCK_BLOCKS - 1), abs=1e-6), computed
    for computed, usage in usage_while_decoding(compressed, prompt):
        assert usage == pytest.approx(held_pages(BLOCK, length, computed, ratios) / (COMPRESSED_BLOCKS - 1), abs=1e-6), computed
    assert compressed.metric("vllm:kv_cache_usage_perc") == 0.0

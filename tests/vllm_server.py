"""Start `vllm serve` on the demo model for end-to-end tests, and talk to it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import requests

from benchmarks.serving import VLLM, ServerProcess, free_port, vllm_server, vllm_servers
from prefixkv_vllm.config import PrefixKVConfig
from prefixkv_vllm.policy.paged import PagedLayout, live_blocks

COLORS = ("red", "blue", "green", "yellow")


def document(items: int, offset: int = 0) -> str:
    return " ".join(
        f"Item {i}: the {COLORS[i % 4]} box on shelf {i % 7} holds {i * 7 % 101} marbles."
        for i in range(offset, offset + items)
    )


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    document(40) + "\nHow many marbles does the box of item 12 hold?",
    "Summarize the following text in one sentence.\n" + document(60, offset=5),
    "Explain what a KV cache is in a transformer, in two sentences.",
]
LONG_PROMPTS = [document(120, offset=k * 13) + f"\nWhich color is the box of item {k * 13 + 3}?" for k in range(4)]

SERVE_DEFAULTS = ["--dtype", "float32", "--enforce-eager", "--block-size", "32", "--served-model-name", "demo"]


class Server(ServerProcess):
    def metric_by_engine(self, name: str) -> dict[str, float]:
        """One ``vllm:*`` metric per engine (data-parallel rank), from its ``engine`` label."""
        text = requests.get(f"{self.base_url}/metrics", timeout=30).text
        pattern = rf'^{re.escape(name)}\{{[^}}]*engine="(\d+)"[^}}]*\}} (\S+)$'
        return {engine: float(value) for engine, value in re.findall(pattern, text, re.M)}

    def chat(self, content: str, max_tokens: int = 48, **extra) -> dict:
        body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        body.update({"temperature": 0, **extra})
        response = requests.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()

    def stream_chat(self, content: str, max_tokens: int, progress: list, index: int, **extra) -> str:
        """Streams a chat completion, counting received chunks in ``progress[index]``."""
        body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        body.update({"temperature": 0, "stream": True, **extra})
        pieces = []
        with requests.post(f"{self.base_url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                pieces.append(delta)
                progress[index] += 1
        return "".join(pieces)


def _spec(model: str, args: tuple[str, ...], env: dict | None, log_dir: Path) -> tuple:
    log_path = log_dir / f"vllm-{time.time_ns()}.log"
    return model, [*SERVE_DEFAULTS, *args], log_path, {"VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}


def serve(model: str, *args: str, env: dict | None = None, log_dir: Path, timeout: float = 900):
    model, server_args, log_path, server_env = _spec(model, args, env, log_dir)
    return vllm_server(model, server_args, log_path=log_path, env=server_env, server_class=Server, timeout=timeout)


@contextlib.contextmanager
def serve_together(model: str, servers: dict[str, tuple[tuple[str, ...], dict | None]], *, log_dir: Path, timeout: float = 900):
    """``serve`` for each named ``(args, env)``, all started at once (``vllm_servers``); yields ``{name: server}``."""
    specs = [_spec(model, args, env, log_dir) for args, env in servers.values()]
    with vllm_servers(specs, server_class=Server, timeout=timeout) as started:
        yield dict(zip(servers, started))


def run_startup_failure(model: str, *args: str, log_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `vllm serve` expecting it to fail before serving."""
    command = [VLLM, "serve", model, "--port", str(free_port()), *SERVE_DEFAULTS, *args]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def concurrent_streams(server: Server, prompts: list[str], max_tokens: int, on_progress=None, **extra) -> list[str]:
    """Streams all prompts at once; calls ``on_progress(progress)`` every 0.2 s until all finish."""
    progress = [0] * len(prompts)
    results: list[str | BaseException] = [""] * len(prompts)

    def run(index: int) -> None:
        try:
            results[index] = server.stream_chat(prompts[index], max_tokens, progress, index, **extra)
        except BaseException as exc:  # reported below, in the test's thread
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if on_progress is not None:
            on_progress(progress)
        time.sleep(0.2)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def usage_while_decoding(server, prompt: list[int], max_tokens: int = 512, headers: dict | None = None, samples: int = 32) -> list[tuple[int, float]]:
    """``(computed, usage)`` for decode steps of one request: the KV usage after the step,
    with ``computed`` the tokens cached before it (``held_pages``).

    Each pair comes from one ``/metrics`` scrape, and vLLM's API server updates the usage
    and the generated-token count in one record per engine step, so a pair is exact however
    far the engine runs ahead of the stream. But the request must still be running at the
    first scrape: under load a 4-layer model decoded 512 tokens before it (seen in CI), so
    give a fast model a long ``max_tokens``; the request is aborted once ``samples`` pairs
    are read. Counts are summed over engines, so the request must be the server's only one.
    """
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    generated_before = server.metric("vllm:generation_tokens_total")
    pairs, seen = [], []
    with requests.post(f"{server.base_url}/v1/completions", json=body, stream=True, timeout=600, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                metrics = server.metrics()
                generated = round(metrics["vllm:generation_tokens_total"] - generated_before)
                seen.append(generated)
                # Token g comes from the step on token g - 1: the first decode step, which compacts
                # the prompt, gives the second; the step that gives the last frees everything.
                if 2 <= generated < max_tokens:
                    pairs.append((len(prompt) + generated - 2, metrics["vllm:kv_cache_usage_perc"]))
                if len(pairs) == samples:
                    break  # closing the stream aborts the request
    wait_for_an_empty_pool(server, headers)
    assert pairs, f"no sample was taken while the request decoded (tokens generated at each scrape: {seen[:20]})"
    return pairs


def wait_for_an_empty_pool(server, headers: dict | None = None, timeout: float = 60) -> None:
    """Until the server's KV usage is 0 again. vLLM publishes usage at engine steps only, and an
    aborted request takes no further step, so a one-token request (freed in its only step)
    makes the engine publish it."""
    body = {"model": "demo", "prompt": [100], "max_tokens": 1}
    deadline = time.time() + timeout
    while True:
        requests.post(f"{server.base_url}/v1/completions", json=body, timeout=60, headers=headers).raise_for_status()
        if server.metric("vllm:kv_cache_usage_perc") == 0.0:
            return
        assert time.time() < deadline, "KV usage did not return to 0"
        time.sleep(0.2)


def held_pages(block_size: int, prompt_len: int, computed: int, ratios) -> int:
    """One-layer blocks a request holds in the step on ``computed`` cached tokens, by the block arithmetic (default decode settings)."""
    defaults = PrefixKVConfig()
    layout = PagedLayout(block_size, defaults.sink, defaults.recent, defaults.decode, defaults.decode_interval, prefix_caching=True)
    allocated = math.ceil((computed + 1) / block_size)  # the step's new token has its slot
    return sum(allocated - live_blocks(prompt_len, computed, r, layout)[0] for r in ratios)

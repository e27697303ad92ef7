"""KV memory after prefill, and serving under memory pressure, read from vLLM's own metrics.

Starts ``vllm serve`` on the demo model once per configuration (stock vLLM with
``--kv-policy none``, then the plugin's policies and budgets), streams requests to
it over HTTP and polls its Prometheus ``/metrics`` every ``--poll`` seconds:

1. **Decode-time KV usage.** ``--concurrent`` prompts of about ``--prompt-tokens``
   tokens are sent at once and decode ``--decode-tokens`` tokens each with
   ``ignore_eos``. Reported: the peak of ``vllm:kv_cache_usage_perc`` (prefill
   included: a prompt holds all its blocks until its last chunk has run), its mean
   and maximum while every request is decoding, the ratio of that to stock vLLM,
   and the usage the block arithmetic predicts (``kept_prompt_blocks`` per layer,
   plus the tail block and generated tokens), and the usage once all requests
   finished (0 means no leaked blocks).
2. **Memory pressure.** ``--pressure-requests`` prompts of about
   ``--pressure-prompt-tokens`` tokens, each decoding ``--pressure-decode-tokens``
   tokens, sent at once to a server whose KV pool is ``VLLM_CPU_KVCACHE_SPACE``
   GiB. Reported: wall time, output tokens/s, the most requests running at once
   (``vllm:num_requests_running``), preemptions (``vllm:num_preemptions_total``)
   and mean time to first token.

Every configuration gets the same pool in bytes (the same ``VLLM_CPU_KVCACHE_SPACE``);
with per-layer keep ratios the plugin splits the pool into one KV-cache group per
distinct ratio, and ``vllm:kv_cache_usage_perc`` stays the used share of that pool.
Writes ``memory.md``, ``memory.png`` and ``memory.json`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/NAME.py`: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe, serving_dtype  # noqa: E402
from benchmarks.serving import ServerProcess, vllm_server, vllm_version  # noqa: E402
from prefixkv_vllm.tools.demo_model import DEMO_MODELS  # noqa: E402

BLOCK_SIZE = 32
SERVE_ARGS = [
    "--enforce-eager", "--block-size", str(BLOCK_SIZE), "--served-model-name", "demo",
    "--no-enable-prefix-caching",
]  # fmt: skip


# --- server ----------------------------------------------------------------------


class Server(ServerProcess):
    def stream_completion(self, prompt_ids: list[int], max_tokens: int, record: dict) -> None:
        body = {
            "model": "demo", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
        }  # fmt: skip
        request = urllib.request.Request(
            f"{self.base_url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        record["sent"] = time.time()
        with urllib.request.urlopen(request, timeout=3600) as response:
            for raw in response:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    if record["chunks"] == 0:
                        record["first_token"] = time.time()
                    record["chunks"] += 1
        record["done"] = time.time()


def serve(model: str, extra_args: list[str], kv_space_gib: int, log_path: Path, max_model_len: int, reserved_cpus: int, timeout: float = 900):
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib)}
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved_cpus))
    args = ["--max-model-len", str(max_model_len), *SERVE_ARGS, *extra_args]
    return vllm_server(model, args, log_path=log_path, env=env, server_class=Server, timeout=timeout)


# --- one load ----------------------------------------------------------------------


def run_load(server: Server, prompts: list[list[int]], max_tokens: int, poll_s: float) -> dict:
    """All prompts at once; samples /metrics and per-request progress until every stream ended."""
    records = [{"chunks": 0, "sent": None, "first_token": None, "done": None, "error": None} for _ in prompts]
    before = server.metrics()

    def worker(index: int) -> None:
        try:
            server.stream_completion(prompts[index], max_tokens, records[index])
        except Exception as exc:  # reported with the results
            records[index]["error"] = repr(exc)

    from benchmarks.prompts import CpuMeter

    meter = CpuMeter(server.process.pid)
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(prompts))]
    started = time.time()
    for thread in threads:
        thread.start()
    samples = []
    while any(thread.is_alive() for thread in threads):
        try:
            values = server.metrics()
        except OSError:
            values = {}
        samples.append(
            {
                "t": time.time() - started,
                "usage": values.get("vllm:kv_cache_usage_perc"),
                "running": values.get("vllm:num_requests_running"),
                "waiting": values.get("vllm:num_requests_waiting"),
                "progress": [r["chunks"] for r in records],
                "finished": [r["done"] is not None for r in records],
            }
        )
        meter.sample()
        time.sleep(poll_s)
    wall_s = time.time() - started
    cpu = meter.result()
    time.sleep(2 * poll_s)  # let the gauges catch up with the last step
    after = server.metrics()
    errors = [r["error"] for r in records if r["error"]]
    return {
        "wall_s": wall_s,
        "samples": samples,
        "records": records,
        "errors": errors,
        "preemptions": after.get("vllm:num_preemptions_total", 0.0) - before.get("vllm:num_preemptions_total", 0.0),
        "usage_after": after.get("vllm:kv_cache_usage_perc"),
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": sum(r["chunks"] for r in records),
        "cpu": cpu,
    }


# --- expected usage from the block arithmetic -----------------------------------------


def model_layout(model: str) -> dict:
    """What the block arithmetic needs of a checkpoint: its compressed and sliding-window layers, and the bytes of a layer's block."""
    from types import SimpleNamespace

    from prefixkv_vllm.policy.layers import full_attention_layers

    config = json.loads((Path(model) / "config.json").read_text())
    text = config.get("text_config", config)
    num_layers = text["num_hidden_layers"]
    full = full_attention_layers(SimpleNamespace(**text), num_layers)
    kv_heads = text.get("num_key_value_heads") or text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return {
        "num_layers": num_layers,
        "full_layers": len(full),
        "sliding_layers": num_layers - len(full),  # the models benchmarked here have only these two kinds
        "sliding_window": text.get("sliding_window"),
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "page_bytes": 2 * kv_heads * head_dim * 4 * BLOCK_SIZE,  # fp32 keys and values of one layer's block
        "name": Path(model).name,
    }


def expected_pages(prompt_len: int, generated: int, ratios: list[float] | None, layout_info: dict, decode: str = "off") -> float:
    """Layer blocks ("pages") a request holds after ``generated`` tokens, by the block arithmetic.

    Full-attention layers: the layout contract the server uses (``policy.paged``) at the server's
    defaults (``PrefixKVConfig``: sink, recent window, decode interval), or every block without a
    policy. Sliding-window layers: vLLM's own rule (the blocks before the window are freed),
    with or without a policy.
    """
    import numpy as np

    from prefixkv_vllm.config import PrefixKVConfig as defaults
    from prefixkv_vllm.policy.paged import PagedLayout, live_blocks

    # The last generated token is not in the cache yet when it is returned.
    computed = prompt_len + max(0, generated - 1)
    total = math.ceil(computed / BLOCK_SIZE)
    if ratios:
        layout = PagedLayout(BLOCK_SIZE, defaults.sink, defaults.recent, decode, defaults.decode_interval, prefix_caching=False)
        start, _ = live_blocks(prompt_len, computed, np.array(ratios), layout)
        full = float(np.sum(total - np.asarray(start)))
    else:
        full = float(layout_info["full_layers"] * total)
    if not layout_info["sliding_layers"]:
        return full
    skipped = max(0, computed - layout_info["sliding_window"] + 1) // BLOCK_SIZE
    return full + layout_info["sliding_layers"] * (total - skipped)


def _ratios_from_log(log: str) -> list[float] | None:
    for line in log.splitlines():
        if "keep ratios per layer: " in line:
            return [float(r) for r in line.split("keep ratios per layer: ")[1].split(";")[0].split()]
    return None


def _capacity_from_log(log: str) -> int | None:
    match = re.search(r"KV cache size: ([\d,]+) tokens", log)
    return int(match.group(1).replace(",", "")) if match else None


# --- configurations ---------------------------------------------------------------------


def config_name(config: dict) -> str:
    if config["policy"] == "none":
        return "stock (none)"
    return f"{config['policy']}@{config['budget']:g} decode {config['decode']}"


def config_args(config: dict, scorer: str | None) -> list[str]:
    if config["policy"] == "none":
        return []
    scorer_args = [] if scorer is None else ["--kv-scorer", scorer]
    return ["--kv-policy", config["policy"], "--kv-budget", str(config["budget"]), *scorer_args, "--kv-decode", config["decode"]]


def summarize_decode(load: dict, prompts: list[list[int]], ratios, layout_info: dict, pool_pages: int, mode: str) -> dict:
    """Usage while every request decodes (after its first token, before any finished)."""
    decode = [s for s in load["samples"] if s["usage"] is not None and min(s["progress"]) >= 2 and not any(s["finished"])]
    usages = [s["usage"] for s in decode]
    peak = max((s["usage"] for s in load["samples"] if s["usage"] is not None), default=float("nan"))
    result = {
        "peak_usage": peak,
        "decode_samples": len(decode),
        "decode_usage_mean": sum(usages) / len(usages) if usages else float("nan"),
        "decode_usage_max": max(usages) if usages else float("nan"),
        "usage_after": load["usage_after"],
        "wall_s": load["wall_s"],
        "foreign_share": load["cpu"]["foreign_share"],
        "errors": load["errors"],
    }
    if decode:
        predicted = [
            sum(expected_pages(len(p), g, ratios, layout_info, mode) for p, g in zip(prompts, s["progress"])) / pool_pages for s in decode
        ]
        result["decode_usage_predicted_mean"] = sum(predicted) / len(predicted)
    return result


def summarize_pressure(load: dict) -> dict:
    records = load["records"]
    ttft = [r["first_token"] - r["sent"] for r in records if r["first_token"] and r["sent"]]
    latency = [r["done"] - r["sent"] for r in records if r["done"] and r["sent"]]
    running = [s["running"] for s in load["samples"] if s["running"] is not None]
    usage = [s["usage"] for s in load["samples"] if s["usage"] is not None]
    return {
        "wall_s": load["wall_s"],
        "requests": len(records),
        "output_tokens": load["output_tokens"],
        "prompt_tokens": load["prompt_tokens"],
        "output_tok_s": load["output_tokens"] / load["wall_s"],
        "total_tok_s": (load["output_tokens"] + load["prompt_tokens"]) / load["wall_s"],
        "max_running": max(running, default=float("nan")),
        "preemptions": load["preemptions"],
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else float("nan"),
        "latency_mean_s": sum(latency) / len(latency) if latency else float("nan"),
        "peak_usage": max(usage, default=float("nan")),
        "usage_after": load["usage_after"],
        "foreign_share": load["cpu"]["foreign_share"],
        "errors": load["errors"],
    }


# --- report --------------------------------------------------------------------------------


def markdown(results: list[dict], header: str) -> str:
    lines = [header, ""]
    decode_rows = [r for r in results if "decode" in r]
    if decode_rows:
        stock = next((r["decode"] for r in decode_rows if r["config"]["policy"] == "none"), None)
        lines += [
            "## 1. KV usage while decoding",
            "",
            "`vllm:kv_cache_usage_perc` (share of the KV pool in use). *Peak* includes prefill, when a prompt still holds "
            "all its blocks; *decoding* = samples taken while every request had streamed at least 2 tokens and none had "
            "finished. *Predicted* = the block arithmetic (`policy.paged.live_blocks` per layer: the live run of "
            "blocks after the prompt compaction and the decode rounds) at each sample's progress. *After* = usage once every request finished (0: no leaked blocks).",
            "",
            "| config | peak usage | decoding: mean | decoding: max | predicted (mean) | decoding mean vs stock | samples | after | wall s | other jobs' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in decode_rows:
            d = row["decode"]
            if "error" in d:
                lines.append(f"| {config_name(row['config'])} | FAILED: {d['error']} |" + " |" * 8)
                continue
            ratio = d["decode_usage_mean"] / stock["decode_usage_mean"] if stock and stock.get("decode_usage_mean") else float("nan")
            predicted = d.get("decode_usage_predicted_mean", float("nan"))
            lines.append(
                f"| {config_name(row['config'])} | {d['peak_usage']:.1%} | {d['decode_usage_mean']:.1%} | "
                f"{d['decode_usage_max']:.1%} | {predicted:.1%} | {ratio:.2f}x | {d['decode_samples']} | "
                f"{d['usage_after']:.1%} | {d['wall_s']:.0f} | {d['foreign_share']:.0%} |"
            )
        lines.append("")
    pressure_rows = [r for r in results if "pressure" in r]
    if pressure_rows:
        stock = next((r["pressure"] for r in pressure_rows if r["config"]["policy"] == "none" and "error" not in r["pressure"]), None)
        lines += [
            "## 2. Under memory pressure",
            "",
            "All requests sent at once. *Max running* = the largest `vllm:num_requests_running` sampled; "
            "*preemptions* = increase of `vllm:num_preemptions_total` over the run.",
            "",
            "| config | wall s | output tok/s | vs stock | total tok/s | max running | preemptions | mean TTFT s | mean latency s | peak usage | after | other jobs' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in pressure_rows:
            p = row["pressure"]
            if "error" in p:
                lines.append(f"| {config_name(row['config'])} | FAILED: {p['error']} |" + " |" * 10)
                continue
            speedup = p["output_tok_s"] / stock["output_tok_s"] if stock else float("nan")
            lines.append(
                f"| {config_name(row['config'])} | {p['wall_s']:.0f} | {p['output_tok_s']:.1f} | {speedup:.2f}x | "
                f"{p['total_tok_s']:.0f} | {p['max_running']:.0f}/{p['requests']} | {p['preemptions']:.0f} | "
                f"{p['ttft_mean_s']:.1f} | {p['latency_mean_s']:.1f} | {p['peak_usage']:.1%} | {p['usage_after']:.1%} | "
                f"{p['foreign_share']:.0%} |"
            )
        lines.append("")
    notes = [r for r in results if r.get("capacity_tokens") or r.get("ratios")]
    if notes:
        lines += ["## Server start-up", "", "| config | KV pool (tokens, as vLLM logs it) | keep ratios per layer | start-up s |", "|---|---|---|---|"]
        for r in notes:
            ratios = " ".join(f"{x:.2f}" for x in r["ratios"]) if r.get("ratios") else "-"
            capacity = f"{r['capacity_tokens']:,}" if r.get("capacity_tokens") else "?"
            lines.append(f"| {config_name(r['config'])} | {capacity} | {ratios} | {r.get('startup_s', float('nan')):.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode_rows = [r for r in results if "decode_load" in r]
    pressure_rows = [r for r in results if "pressure_load" in r]
    panels = (1 if decode_rows else 0) + (2 if pressure_rows else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    axes = list(axes) if panels > 1 else [axes]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax_index = 0
    if decode_rows:
        ax = axes[ax_index]
        ax_index += 1
        for i, row in enumerate(decode_rows):
            samples = [s for s in row["decode_load"]["samples"] if s["usage"] is not None]
            ax.plot([s["t"] for s in samples], [100 * s["usage"] for s in samples], label=config_name(row["config"]), color=colors[i % len(colors)])
        ax.set_xlabel("seconds since the requests were sent")
        ax.set_ylabel("vllm:kv_cache_usage_perc (%)")
        ax.set_title("1. KV usage, concurrent long prompts", fontsize=9)
        ax.legend(fontsize=7)
    if pressure_rows:
        ax_usage, ax_running = axes[ax_index], axes[ax_index + 1]
        for i, row in enumerate(pressure_rows):
            samples = [s for s in row["pressure_load"]["samples"] if s["usage"] is not None]
            label = config_name(row["config"])
            ax_usage.plot([s["t"] for s in samples], [100 * s["usage"] for s in samples], label=label, color=colors[i % len(colors)])
            ax_running.plot([s["t"] for s in samples], [s["running"] for s in samples], label=label, color=colors[i % len(colors)])
        ax_usage.set_xlabel("seconds")
        ax_usage.set_ylabel("vllm:kv_cache_usage_perc (%)")
        ax_usage.set_title("2. KV usage under memory pressure", fontsize=9)
        ax_running.set_xlabel("seconds")
        ax_running.set_ylabel("vllm:num_requests_running")
        ax_running.set_title("2. requests running at once", fontsize=9)
        ax_running.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.5], help="budgets for part 1")
    parser.add_argument("--policies", nargs="+", default=["uniform", "prefixkv"], choices=["uniform", "prefixkv", "streaming"])
    parser.add_argument("--scorer", help="--kv-scorer for every plugin configuration (default: the server's)")
    parser.add_argument("--concurrent", type=int, default=4, help="part 1: requests at once")
    parser.add_argument("--prompt-tokens", type=int, default=2000, help="part 1: tokens per prompt")
    parser.add_argument("--decode-tokens", type=int, default=512, help="part 1: tokens decoded per request")
    parser.add_argument("--decode", nargs="+", default=["fifo", "off"], choices=["fifo", "scored", "off"], help="--kv-decode modes for every plugin configuration")
    parser.add_argument("--pressure-budget", type=float, default=0.2, help="part 2: budget compared with stock")
    parser.add_argument("--pressure-policies", nargs="*", default=["uniform", "prefixkv"], help="part 2: policies at that budget (empty: skip part 2)")
    parser.add_argument("--pressure-requests", type=int, default=32)
    parser.add_argument("--pressure-prompt-tokens", type=int, default=1200)
    parser.add_argument("--pressure-decode-tokens", type=int, default=384)
    parser.add_argument("--kv-space-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE for every server (the pool)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default=serving_dtype(), help=f"every server's --dtype (default: {serving_dtype()}, as {describe()})")
    parser.add_argument("--reserved-cpus", type=int, default=0, help="VLLM_CPU_NUM_OF_RESERVED_CPU unless set in the environment (vLLM default 1: on 2 cores the model runs on one thread)")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between /metrics samples")
    parser.add_argument("--skip-decode", action="store_true", help="skip part 1")
    parser.add_argument("--model", choices=DEMO_MODELS, default=DEMO_MODELS[0], help="demo model (`prefixkv demo-model --name`)")
    parser.add_argument("--stem", default="memory", help="output file names: STEM.md, STEM.json, STEM.png")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefixkv-bench-logs")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from benchmarks.prompts import build_prompts
    from prefixkv_vllm.tools.demo_model import model_path

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the running server on the way out
    begun = time.time()
    command_line = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model = str(model_path(args.model))
    layout_info = model_layout(model)
    pool_pages = args.kv_space_gib * 2**30 // layout_info["page_bytes"]  # every configuration's pool, in layer blocks
    tokenizer = AutoTokenizer.from_pretrained(model)
    decode_prompts = [p.prompt_token_ids for p in build_prompts(tokenizer, args.concurrent, args.prompt_tokens - 100, args.prompt_tokens, seed=1)]
    pressure_prompts = [
        p.prompt_token_ids
        for p in build_prompts(tokenizer, args.pressure_requests, args.pressure_prompt_tokens - 200, args.pressure_prompt_tokens, seed=2)
    ]

    configs = [{"policy": "none"}]
    for budget in sorted(set(args.budgets) | ({args.pressure_budget} if args.pressure_policies else set())):
        for policy in args.policies + [p for p in args.pressure_policies if p not in args.policies]:
            configs.extend({"policy": policy, "budget": budget, "decode": decode} for decode in args.decode)
    results = []
    for config in configs:
        in_decode = not args.skip_decode and (config["policy"] == "none" or (config["budget"] in args.budgets and config["policy"] in args.policies))
        in_pressure = bool(args.pressure_policies) and (
            config["policy"] == "none" or (config["budget"] == args.pressure_budget and config["policy"] in args.pressure_policies)
        )
        if not (in_decode or in_pressure):
            continue
        name = config_name(config)
        log_path = args.log_dir / ("memory-" + re.sub(r"[^A-Za-z0-9_.@-]+", "_", name) + ".log")
        row: dict = {"config": config}
        results.append(row)
        print(f"[memory] {name}: starting server (log {log_path})", flush=True)
        started = time.time()
        try:
            with serve(model, ["--dtype", args.dtype, *config_args(config, args.scorer)], args.kv_space_gib, log_path, args.max_model_len, args.reserved_cpus) as server:
                row["startup_s"] = time.time() - started
                log = server.log()
                row["ratios"] = _ratios_from_log(log)
                row["capacity_tokens"] = _capacity_from_log(log)
                if in_decode:
                    load = run_load(server, decode_prompts, args.decode_tokens, args.poll)
                    row["decode_load"] = load
                    row["decode"] = summarize_decode(load, decode_prompts, row["ratios"], layout_info, pool_pages, config.get("decode", "off"))
                    d = row["decode"]
                    print(
                        f"[memory] {name}: decode usage mean {d['decode_usage_mean']:.1%} (predicted "
                        f"{d.get('decode_usage_predicted_mean', float('nan')):.1%}), peak {d['peak_usage']:.1%}, "
                        f"after {d['usage_after']:.1%}, {d['wall_s']:.0f} s",
                        flush=True,
                    )
                if in_pressure:
                    load = run_load(server, pressure_prompts, args.pressure_decode_tokens, args.poll)
                    row["pressure_load"] = load
                    row["pressure"] = summarize_pressure(load)
                    p = row["pressure"]
                    print(
                        f"[memory] {name}: pressure {p['wall_s']:.0f} s, {p['output_tok_s']:.1f} output tok/s, "
                        f"max running {p['max_running']:.0f}, preemptions {p['preemptions']:.0f}",
                        flush=True,
                    )
        except Exception as exc:  # keep the other configurations
            message = str(exc).splitlines()[0] if str(exc) else repr(exc)
            print(f"[memory] {name}: FAILED: {exc}", file=sys.stderr, flush=True)
            for part, wanted in (("decode", in_decode), ("pressure", in_pressure)):
                if wanted and part not in row:
                    row[part] = {"error": message}
        row["server_s"] = time.time() - started

    total_s = time.time() - begun
    header = "\n".join(
        [
            "# Memory: KV usage after prefill and serving under memory pressure",
            "",
            f"- Command: `{command_line}`",
            f"- Date: {datetime.date.today().isoformat()}; device: {os.cpu_count()}-core CPU ({platform.machine()}), no GPU; "
            f"`vllm serve` ({vllm_version()}) with --dtype {args.dtype} ({describe()}) {' '.join(SERVE_ARGS[:-3])} --max-model-len {args.max_model_len}, "
            f"prefix caching off, VLLM_CPU_KVCACHE_SPACE={args.kv_space_gib} (the same pool in bytes for every configuration), "
            f"VLLM_CPU_NUM_OF_RESERVED_CPU={os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU', args.reserved_cpus)}",
            f"- Model: {describe_model(layout_info)}",
            f"- Plugin: {f'`--kv-scorer {args.scorer}`' if args.scorer else 'the default scorer'}, sink 1, recent 64, "
            "decode rounds every 128 tokens; `prefixkv` ratios calibrated at start-up (cached)",
            f"- Part 1: {args.concurrent} prompts of {min(map(len, decode_prompts))}-{max(map(len, decode_prompts))} tokens "
            f"sent at once, {args.decode_tokens} tokens decoded each (`ignore_eos`), `/metrics` polled every {args.poll} s",
            f"- Part 2: {args.pressure_requests} prompts of {min(map(len, pressure_prompts))}-{max(map(len, pressure_prompts))} tokens "
            f"sent at once, {args.pressure_decode_tokens} tokens each (`ignore_eos`), greedy"
            if args.pressure_policies
            else "- Part 2: not run",
            "- Prompts: `benchmarks/prompts.py` (docstring documents, records, needles); all requests stream over HTTP",
            "- *Other jobs' CPU*: CPU time that processes outside this benchmark took during the load, as a share of the "
            "machine (from /proc); the machine is shared, so compare timings only where it is near 0",
            f"- Total run time: {total_s / 60:.1f} min",
        ]
    )
    table = markdown(results, header)
    (args.out_dir / f"{args.stem}.md").write_text(table)
    (args.out_dir / f"{args.stem}.json").write_text(json.dumps({"command": command_line, "results": [_compact(r) for r in results]}))
    plot(results, args.out_dir / f"{args.stem}.png")
    print(table)
    return 0 if all("error" not in r.get(p, {}) for r in results for p in ("decode", "pressure")) else 1


def describe_model(info: dict) -> str:
    per_token_kib = info["num_layers"] * info["page_bytes"] / BLOCK_SIZE / 1024
    kinds = f"{info['num_layers']} layers"
    if info["sliding_layers"]:
        kinds += f" ({info['full_layers']} full attention, compressed; {info['sliding_layers']} sliding-window of {info['sliding_window']} tokens, vLLM's own)"
    return f"`{info['name']}` (`prefixkv demo-model`), {kinds}, {info['kv_heads']} KV heads of {info['head_dim']}: {per_token_kib:.0f} KiB of fp32 KV per token"


def _compact(row: dict) -> dict:
    """The row for memory.json: sample series as columns, without per-request progress."""
    row = dict(row)
    for key in ("decode_load", "pressure_load"):
        if key in row:
            load = dict(row[key])
            samples = load.pop("samples")
            load["series"] = {
                "t": [round(s["t"], 2) for s in samples],
                "usage": [s["usage"] for s in samples],
                "running": [s["running"] for s in samples],
                "waiting": [s["waiting"] for s in samples],
                "min_tokens_streamed": [min(s["progress"]) for s in samples],
                "finished": [sum(s["finished"]) for s in samples],
            }
            row[key] = load
    return row


if __name__ == "__main__":
    sys.exit(main())

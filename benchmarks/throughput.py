"""Serving throughput with the same KV pool, measured with vLLM's own load generator.

For each shape (input + output tokens) this starts ``vllm serve`` on the demo model
once per configuration (stock vLLM, then each policy at each budget), every one
with the same KV pool in bytes (``--kv-cache-memory-bytes``; ``--num-gpu-blocks-override``
would count blocks over all KV-cache groups), and runs ``vllm bench serve``
(random dataset, ``--ignore-eos``, all requests at once). While it runs, ``/metrics``
is polled for KV usage, requests running and preemptions.

Reported per shape: output tok/s and its ratio to stock *in the same run*,
request/s, TTFT and TPOT p50/p99, most requests running at once, preemptions, KV
usage (mean while nothing waits, and peak; ``benchmarks/memory.py`` checks usage
against the block arithmetic, where each request's progress is known), usage
after the load, and two bounds on what any KV compression can gain:

* Amdahl's: stock's time over the time stock needs for the same prompts with one
  output token each (the prefill share), the most while prefill is unchanged;
* the ceiling (``--ceiling``): stock with a pool that holds every request at once,
  i.e. what a larger batch alone buys where a step's cost grows with the batch (a
  CPU). Compression can pass it only by what it saves inside attention, which reads
  fewer keys.

The ``shared1024+512+256`` shape runs vLLM's prefix-repetition dataset instead: one
1024-token prefix shared by every request, a unique 512-token suffix each, 256 output
tokens, prefix caching on for every server (vLLM's default); its table adds the
prefix-cache hit rate (``vllm:prefix_cache_hits`` over ``vllm:prefix_cache_queries``).

Every server runs in ``--dtype`` (default: what this CPU serves fastest, ``machine.py``);
``--kv-cache-dtypes auto fp8`` runs every configuration with each KV-cache dtype, in the
same pool bytes (fp8 holds twice the tokens).

Writes ``STEM.md``, ``STEM.png`` and ``STEM.json`` under ``--out-dir`` (``--stem``, default ``throughput``).
``--quick`` runs a small shape for the test suite.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/NAME.py`: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe, serving_dtype  # noqa: E402
from benchmarks.serving import VLLM, ServerProcess, vllm_server, vllm_version  # noqa: E402
from prefixkv_vllm.config import ADMISSION_MODES  # noqa: E402
from prefixkv_vllm.policy.paged import DECODE_MODES  # noqa: E402

BLOCK_SIZE = 32
SERVE_ARGS = ["--enforce-eager", "--block-size", str(BLOCK_SIZE), "--served-model-name", "demo"]
# input tokens, output tokens, requests, KV pool bytes (the sizes the issues measured stock with),
# and the tokens every prompt shares (0: vLLM's random dataset; else its prefix-repetition dataset).
# 256+2048 is the 32 requests and 12,800-token pool halved, the same pool per request,
# so that the three shapes at two budgets run in one sitting (71 minutes on 2 cores,
# results/throughput-all.md).
SHAPES = {
    "1024+512": (1024, 512, 48, 1 << 30, 0),
    "256+2048": (256, 2048, 16, 294_912_000, 0),
    "2048+128": (2048, 128, 32, 1 << 30, 0),
    "shared1024+512+256": (1536, 256, 32, 1 << 29, 1024),
}


def shape_name(shape) -> str:
    input_len, output_len, _, _, shared = shape
    return f"shared{shared}+{input_len - shared}+{output_len}" if shared else f"{input_len}+{output_len}"


def config_name(config: dict) -> str:
    cache = f", {config['cache']} KV" if config.get("cache", "auto") != "auto" else ""
    if config.get("ceiling"):
        return f"stock{cache}, pool for all (ceiling)"
    if config["policy"] == "none":
        return f"stock{cache}"
    tiers = f", {config['tiers']} tiers" if "tiers" in config else ""
    interval = f" every {config['interval']}" if "interval" in config else ""
    admission = f", {config['admission']} admission" if "admission" in config else ""
    return f"{config['policy']}@{config['budget']:g} ({config['decode']}{interval}{tiers}{admission}){cache}"


def config_args(config: dict) -> list[str]:
    cache = ["--kv-cache-dtype", config["cache"]] if config.get("cache", "auto") != "auto" else []
    if config["policy"] == "none":
        return cache
    tiers = ["--kv-tiers", str(config["tiers"])] if "tiers" in config else []
    interval = ["--kv-decode-interval", str(config["interval"])] if "interval" in config else []
    admission = ["--kv-admission", config["admission"]] if "admission" in config else []
    return [
        "--kv-policy", config["policy"], "--kv-budget", str(config["budget"]), "--kv-decode", config["decode"],
        *interval, *tiers, *admission, *cache,
    ]  # fmt: skip


def poll_metrics(server: ServerProcess, stop: threading.Event, samples: list, period: float) -> None:
    while not stop.is_set():
        try:
            samples.append({"t": time.time(), **server.metrics()})
        except OSError:
            pass
        stop.wait(period)


def dataset_args(input_len: int, output_len: int, shared: int) -> list[str]:
    if not shared:
        return ["--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len)]
    return [
        "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(shared),
        "--prefix-repetition-suffix-len", str(input_len - shared), "--prefix-repetition-num-prefixes", "1",
        "--prefix-repetition-output-len", str(output_len),
    ]  # fmt: skip


def bench(server: ServerProcess, model: str, shape, output_len: int, result_dir: Path, name: str) -> dict:
    """One ``vllm bench serve`` run; returns its saved JSON result."""
    input_len, _, num_prompts, _, shared = shape
    port = server.base_url.rsplit(":", 1)[1]
    command = [
        VLLM, "bench", "serve", "--backend", "vllm", "--port", port, "--model", "demo", "--tokenizer", model,
        *dataset_args(input_len, output_len, shared),
        "--num-prompts", str(num_prompts), "--request-rate", "inf", "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{name}.json",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return json.loads((result_dir / f"{name}.json").read_text())


def run_config(model, config, shape, args, result_dir, log_dir) -> dict:
    input_len, output_len, num_prompts, pool_bytes, shared = shape
    pool_bytes = config.get("pool_bytes") or args.kv_cache_bytes or pool_bytes
    serve_args = ["--max-model-len", str(input_len + output_len + 64), "--dtype", args.dtype, *SERVE_ARGS]
    serve_args += ["--kv-cache-memory-bytes", str(pool_bytes), *config_args(config)]
    output_len = config.get("output_len", output_len)
    name = re.sub(r"[^A-Za-z0-9.+-]", "-", f"{config_name(config)}-{shape_name(shape)}")
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(args.reserved_cpus)}
    with vllm_server(model, serve_args, log_path=log_dir / f"{name}.log", env=env, timeout=1200) as server:
        samples: list = []
        stop = threading.Event()
        poller = threading.Thread(target=poll_metrics, args=(server, stop, samples, args.poll), daemon=True)
        poller.start()
        started = time.time()
        result = bench(server, model, shape, output_len, result_dir, name)
        stop.set()
        poller.join()
        time.sleep(1.0)
        after = server.metrics()
        log = server.log()
    capacity = re.search(r"KV cache size: ([\d,]+) tokens", log)
    pool_blocks = int(capacity.group(1).replace(",", "")) // BLOCK_SIZE if capacity else None
    # While requests decode (some generated, nothing waiting): the pool's steady state.
    decoding = [
        s["vllm:kv_cache_usage_perc"]
        for s in samples
        if s.get("vllm:num_requests_running") and not s.get("vllm:num_requests_waiting") and s.get("vllm:generation_tokens_total")
    ]
    first = samples[0] if samples else {}

    def delta(metric: str) -> float:
        return after.get(metric, 0.0) - first.get(metric, 0.0)

    return {
        "config": config_name(config),
        "shape": shape_name(shape) if output_len == shape[1] else f"{input_len}+{output_len}",
        "duration_s": result["duration"],
        "wall_s": time.time() - started,
        "output_tok_s": result["output_throughput"],
        "request_s": result["request_throughput"],
        "ttft_p50_ms": result.get("p50_ttft_ms"), "ttft_p99_ms": result.get("p99_ttft_ms"),
        "tpot_p50_ms": result.get("p50_tpot_ms"), "tpot_p99_ms": result.get("p99_tpot_ms"),
        "completed": result["completed"],
        "max_running": max((s.get("vllm:num_requests_running", 0) for s in samples), default=0),
        "preemptions": delta("vllm:num_preemptions_total"),
        "prefix_hit_rate": delta("vllm:prefix_cache_hits_total") / max(1.0, delta("vllm:prefix_cache_queries_total")),
        "usage_mean": sum(decoding) / len(decoding) if decoding else None,
        "usage_max": max((s.get("vllm:kv_cache_usage_perc", 0) for s in samples), default=None),
        "usage_after": after.get("vllm:kv_cache_usage_perc"),
        "pool_tokens": pool_blocks * BLOCK_SIZE if pool_blocks else None,
        "pool_bytes": pool_bytes,
        **({"ceiling": True} if config.get("ceiling") else {}),
    }


def ceiling_pool_bytes(stock: dict, shape) -> int:
    """A pool that holds every request of ``shape`` whole, at stock's bytes per token."""
    input_len, output_len, num_prompts, _, _ = shape
    per_request = -(-(input_len + output_len) // BLOCK_SIZE) * BLOCK_SIZE
    return int(stock["pool_bytes"] / stock["pool_tokens"] * per_request * num_prompts * 1.05)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    for shape in dict.fromkeys(r["shape"] for r in rows if not r.get("prefill_only")):
        shape_rows = [r for r in rows if r["shape"] == shape and not r.get("prefill_only")]
        stock = next((r for r in shape_rows if r["config"] == "stock"), None)
        prefill = next((r for r in rows if r.get("prefill_only") and r["shape"] == shape), None)
        pool = shape_rows[0]["pool_bytes"]
        lines += [f"### {shape} ({shape_rows[0]['completed']} requests, KV pool {pool / 2**20:.0f} MiB = {shape_rows[0]['pool_tokens']:,} tokens for stock)", ""]
        if stock and prefill:
            bound = stock["duration_s"] / prefill["duration_s"]
            lines += [f"Prefill share of stock's time: {prefill['duration_s']:.1f} s of {stock['duration_s']:.1f} s "
                      f"({100 / bound:.0f}%); Amdahl's bound on any KV compression's gain: {bound:.2f}x.", ""]  # fmt: skip
        ceiling = next((r for r in shape_rows if r.get("ceiling")), None)
        if stock and ceiling:
            lines += [f"Ceiling: stock with a pool for every request at once ({ceiling['pool_bytes'] / 2**20:.0f} MiB) gives "
                      f"{ceiling['output_tok_s'] / stock['output_tok_s']:.2f}x stock: what a larger batch alone buys on this "
                      f"machine at this shape (compression passes it only by reading fewer keys in attention).", ""]  # fmt: skip
        lines += [
            "| config | duration | output tok/s | vs stock | req/s | TTFT p50 / p99 | TPOT p50 / p99 | max running | preemptions | KV usage mean / max | after | prefix hits |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in shape_rows:
            ratio = f"{r['output_tok_s'] / stock['output_tok_s']:.2f}x" if stock else "-"
            usage = "-" if r["usage_mean"] is None else f"{100 * r['usage_mean']:.0f}% / {100 * r['usage_max']:.0f}%"
            lines.append(
                f"| {r['config']} | {r['duration_s']:.1f} s | {r['output_tok_s']:.1f} | {ratio} | {r['request_s']:.3f} | "
                f"{r['ttft_p50_ms'] / 1000:.1f} / {r['ttft_p99_ms'] / 1000:.1f} s | {r['tpot_p50_ms']:.0f} / {r['tpot_p99_ms']:.0f} ms | "
                f"{r['max_running']:.0f} | {r['preemptions']:.0f} | {usage} | {100 * (r['usage_after'] or 0):.1f}% | "
                f"{100 * r.get('prefix_hit_rate', 0):.0f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows if not r.get("prefill_only")))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        shape_rows = [r for r in rows if r["shape"] == shape and not r.get("prefill_only")]
        ax.bar(range(len(shape_rows)), [r["output_tok_s"] for r in shape_rows], color="tab:blue")
        ax.set_xticks(range(len(shape_rows)), [r["config"] for r in shape_rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{shape}: output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--policies", nargs="+", default=["prefixkv", "uniform"], choices=["prefixkv", "uniform", "streaming"])
    parser.add_argument("--decode", nargs="+", default=["fifo"], choices=DECODE_MODES)
    parser.add_argument("--tiers", nargs="+", type=int, default=[], help="also run prefixkv with each --kv-tiers count")
    parser.add_argument("--intervals", nargs="+", type=int, default=[], help="also run prefixkv with each --kv-decode-interval")
    parser.add_argument("--admissions", nargs="+", default=[], choices=ADMISSION_MODES, help="also run prefixkv with each --kv-admission")
    parser.add_argument("--dtype", default=serving_dtype(), help=f"every server's --dtype (default: {serving_dtype()}, as {describe()})")
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], help="run every configuration with each --kv-cache-dtype (e.g. auto fp8)")
    parser.add_argument("--num-prompts", type=int, help="override every shape's request count")
    parser.add_argument("--kv-cache-bytes", type=int, help="the KV pool of every server (default: the shape's own, in SHAPES)")
    parser.add_argument("--no-amdahl", action="store_true", help="skip the prefill-only stock run")
    parser.add_argument("--ceiling", action="store_true", help="also run stock with a pool that holds every request at once")
    parser.add_argument("--reserved-cpus", type=int, default=1, help="VLLM_CPU_NUM_OF_RESERVED_CPU (vLLM's default 1: on 2 cores the model runs on one thread)")
    parser.add_argument("--quick", action="store_true", help="a small shape for the test suite")
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--stem", help="output file names: STEM.md, STEM.json, STEM.png (default: throughput, or throughput-quick with --quick)")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefixkv-bench-logs")
    args = parser.parse_args(argv)
    from prefixkv_vllm.tools.demo_model import demo_model_path

    model = str(demo_model_path())
    shapes = {"256+128": (256, 128, 8, 64 << 20, 0)} if args.quick else {k: SHAPES[k] for k in args.shapes}
    if args.num_prompts:
        shapes = {k: (i, o, args.num_prompts, pool, shared) for k, (i, o, _, pool, shared) in shapes.items()}
    if args.quick:
        args.budgets, args.policies = [0.2], ["uniform"]
    configs = [{"policy": "none"}] + [
        {"policy": p, "budget": b, "decode": d} for b in args.budgets for p in args.policies for d in args.decode
    ]
    variants = [{"tiers": t} for t in args.tiers] + [{"interval": i} for i in args.intervals]
    variants += [{"admission": a} for a in args.admissions]
    configs += [{"policy": "prefixkv", "budget": b, "decode": d, **v} for b in args.budgets for d in args.decode for v in variants]
    configs = [{**c, "cache": cache} for cache in args.kv_cache_dtypes for c in configs]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as result_dir:
        for shape in shapes.values():
            if not args.no_amdahl:
                row = run_config(model, {"policy": "none", "output_len": 1}, shape, args, Path(result_dir), args.log_dir)
                rows.append({**row, "shape": shape_name(shape), "prefill_only": True})
                print(json.dumps(rows[-1]), flush=True)
            for config in configs:
                rows.append(run_config(model, config, shape, args, Path(result_dir), args.log_dir))
                print(json.dumps(rows[-1]), flush=True)
                if args.ceiling and config["policy"] == "none":
                    ceiling = {**config, "ceiling": True, "pool_bytes": ceiling_pool_bytes(rows[-1], shape)}
                    rows.append(run_config(model, ceiling, shape, args, Path(result_dir), args.log_dir))
                    print(json.dumps(rows[-1]), flush=True)
    kinds = {"prefix-repetition" if shape[4] else "random" for shape in shapes.values()}
    datasets = " and ".join(f"{kind} dataset" for kind in sorted(kinds))
    header = (
        f"# Throughput: demo model, {vllm_version()}, {args.dtype} ({describe()}), block size {BLOCK_SIZE}, the same KV pool for every server "
        f"of a shape, `vllm bench serve` {datasets}, --ignore-eos, all requests at once ({time.strftime('%Y-%m-%d')})\n\n"
        f"Command: `python benchmarks/throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    stem = args.stem or ("throughput-quick" if args.quick else "throughput")
    (args.out_dir / f"{stem}.md").write_text(markdown(rows, header) + "\n")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out_dir / f"{stem}.png")
    print(markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())

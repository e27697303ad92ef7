"""Where a decode step's time goes: stock vs the policies, at the same batch.

The throughput targets assume what a GPU gives: a decode step costs about the
same for a larger batch, so admitting more requests is nearly free. This
measures what a step costs here, and on what. Each configuration runs in a
fresh process with the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so ``torch.profiler`` sees the scheduler, the model runner and the kernels:

1. ``--batch`` prompts of ``--prompt-len`` random tokens prefill (a pool that
   holds them all, so nothing is preempted), then ``--warm`` decode steps run;
2. ``--steps`` decode steps are timed without the profiler (the step time);
3. as many again run under ``torch.profiler``, and their self CPU time is summed
   by kind: the linear layers (oneDNN/GEMM), vLLM's attention kernel, the
   ``prefixkv`` ops (scoring, compaction), the other torch ops, and the rest of
   the step's wall time (Python: scheduling, metadata, sampling glue).

The windows include a decode round (every 128 generated tokens by default) when
``--warm`` + ``--steps`` spans one. Writes ``results/decode-profile.md``/``.json``.

    python benchmarks/decode_profile.py [--batch 44] [--prompt-len 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
if __package__ in (None, ""):  # run as `python benchmarks/NAME.py`: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import BLOCK_SIZE  # noqa: E402

CONFIGS = {
    "stock": {},
    "uniform@0.2": {"kv_policy": "uniform", "kv_budget": 0.2},
    "prefixkv@0.2": {"kv_policy": "prefixkv", "kv_budget": 0.2},
    "prefixkv@0.2, 3 tiers": {"kv_policy": "prefixkv", "kv_budget": 0.2, "kv_tiers": 3},
    "prefixkv@0.2 (scored)": {"kv_policy": "prefixkv", "kv_budget": 0.2, "kv_decode": "scored"},
}
# Self-CPU-time buckets, first match wins (profiler event names, lower case).
KINDS = (
    ("prefixkv ops", ("prefixkv::",)),
    ("attention kernel", ("cpu_attention_with_kv_cache", "cpu_attn_")),
    ("linear layers", ("onednn_mm", "aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm")),
)


def kind(name: str) -> str:
    lowered = name.lower()
    for label, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return label
    return "other torch ops"


def run_config(settings: dict, args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.memory import model_layout
    from prefixkv_vllm.tools.demo_model import demo_model_path

    model = str(demo_model_path())
    layout = model_layout(model)
    total = args.warm + 2 * args.steps + 1
    max_len = args.prompt_len + total + BLOCK_SIZE
    request_bytes = -(-max_len // BLOCK_SIZE) * layout["num_layers"] * layout["page_bytes"]  # every layer's blocks
    llm = LLM(
        model, dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE, max_model_len=max_len,
        enable_prefix_caching=False, max_num_seqs=args.batch,
        kv_cache_memory_bytes=request_bytes * args.batch * 11 // 10,
        additional_config=settings,
    )  # fmt: skip
    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=total, ignore_eos=True)
    for i in range(args.batch):
        tokens = torch.randint(100, vocab - 100, (args.prompt_len,), generator=generator).tolist()
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=tokens), params)
    produced: dict[str, int] = {}

    def step() -> None:
        for output in engine.step():
            produced[output.request_id] = len(output.outputs[0].token_ids)

    started = time.perf_counter()
    while len(produced) < args.batch or min(produced.values()) < 1:
        step()
    prefill_s = time.perf_counter() - started
    for _ in range(args.warm):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_ms = (time.perf_counter() - started) / args.steps * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        profiled_ms = (time.perf_counter() - started) / args.steps * 1e3
    buckets: dict[str, float] = {}
    top = []
    for event in profiler.key_averages():
        self_ms = event.self_cpu_time_total / 1e3 / args.steps
        label = kind(event.key)
        buckets[label] = buckets.get(label, 0.0) + self_ms
        top.append((self_ms, event.key))
    buckets["Python and the rest"] = profiled_ms - sum(buckets.values())
    return {
        "prefill_s": prefill_s, "step_ms": step_ms, "profiled_step_ms": profiled_ms, "buckets_ms": buckets,
        "top_ops_ms": [[name, ms] for ms, name in sorted(top, reverse=True)[:12]],
        "context": args.prompt_len + args.warm + args.steps,
    }  # fmt: skip


def markdown(results: dict, args, command: str) -> str:
    kinds = [label for label, _ in KINDS] + ["other torch ops", "Python and the rest"]
    lines = [
        f"# Where a decode step's time goes ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`. Demo model, fp32, `--enforce-eager`, block size {BLOCK_SIZE}, one model thread, "
        f"{args.batch} requests of {args.prompt_len} random prompt tokens decoding together (a pool that holds them "
        f"all); after {args.warm} decode steps, {args.steps} steps timed, then {args.steps} under `torch.profiler` "
        "(self CPU time per step, by kind; the profiler slows the step, so the kinds add up to the profiled time).",
        "",
        "| config | step (ms) | per request (ms) | vs stock | profiled step (ms) | "
        + " | ".join(kinds) + " | prefill (s) |",
        "|---" * (6 + len(kinds)) + "|",
    ]
    stock = results.get("stock", {}).get("step_ms")
    for name, r in results.items():
        ratio = f"{r['step_ms'] / stock:.2f}x" if stock else "-"
        cells = " | ".join(f"{r['buckets_ms'].get(k, 0.0):.1f}" for k in kinds)
        lines.append(
            f"| {name} | {r['step_ms']:.1f} | {r['step_ms'] / args.batch:.2f} | {ratio} | {r['profiled_step_ms']:.1f} | "
            f"{cells} | {r['prefill_s']:.1f} |"
        )
    lines += ["", "Top ops by self CPU time per profiled step (ms):", ""]
    for name, r in results.items():
        ops = ", ".join(f"`{op}` {ms:.1f}" for op, ms in r["top_ops_ms"][:6])
        lines.append(f"- {name}: {ops}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=44)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--warm", type=int, default=0, help="decode steps before the timed window")
    # A multiple of --kv-decode-interval, so each window holds whole decode rounds.
    parser.add_argument("--steps", type=int, default=128, help="steps timed, and steps profiled")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=RESULTS / "decode-profile")
    parser.add_argument("--run-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_config:
        print("RESULT " + json.dumps(run_config(json.loads(args.run_config), args)), flush=True)
        return 0
    results = {}
    for name in args.configs:
        forwarded = ["--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--warm", str(args.warm)]
        forwarded += ["--steps", str(args.steps), "--run-config", json.dumps(CONFIGS[name])]
        # One process per configuration: vLLM's plugin and engine state are per process.
        done = subprocess.run([sys.executable, __file__, *forwarded], capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
            raise SystemExit(f"{name}: no result (exit {done.returncode})")
        results[name] = json.loads(line[len("RESULT ") :])
        print(name, json.dumps(results[name]), flush=True)
    command = "python benchmarks/decode_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, args, command.strip()))
    print(markdown(results, args, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

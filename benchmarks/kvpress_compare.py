"""Our default against kvpress's presses: the same prompts, model weights, dtype and budgets.

Our side is the server's default (``prefixkv``, ``snapkv`` scorer, loss-calibrated allocation,
decode rounds) in vLLM, run as ``benchmarks/quality.py`` runs it; kvpress's side is each press
through transformers, in the environment ``scripts/setup_kvpress_env.sh`` builds
(``benchmarks/kvpress_baselines.py``). Every press compresses the whole prompt, question
included, as our server does (scope ``prompt``), and on a hybrid model (Gemma 3) only its
full-attention layers, as our server does; ``--context-presses`` also run kvpress's own
default, the document compressed before the question is seen (scope ``context``).

Every answer is compared with vLLM's full-cache answer (ROUGE-L F1, needles, identical
answers), and every press with our default prompt by prompt: the mean paired difference with
a 95% bootstrap interval (``quality.paired_interval``). transformers' own full-cache answers
are scored too, so that what the two engines differ by without any compression is in the
table. The prompts leave out the modules the start-up calibration reads
(``prefixkv_vllm.calibration.DOCUMENT_MODULES``): no prompt was seen by the calibration.

    python benchmarks/kvpress_compare.py --kvpress-python "$(bash scripts/setup_kvpress_env.sh)" --budgets 0.2 0.5

Writes ``kvpress-MODEL.md``, ``.json`` (every answer) and ``.png`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/NAME.py`: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kvpress_baselines import PRESSES  # noqa: E402
from benchmarks.machine import describe, serving_dtype  # noqa: E402
from benchmarks.quality import REFERENCE, config_name, configurations, launch, paired, run_child, saved_results, score  # noqa: E402
from prefixkv_vllm.config import PrefixKVConfig  # noqa: E402
from prefixkv_vllm.tools.demo_model import DEMO_MODELS  # noqa: E402

TRANSFORMERS_FULL = {"policy": "kvpress", "press": "none"}


def our_default(budget: float) -> dict:
    """The configuration ``quality.py`` names for the server's defaults at ``budget``."""
    (config,) = configurations([budget], ["prefixkv"], [PrefixKVConfig.scorer], PrefixKVConfig.recent)[1:]
    return config


def press_configs(budgets, presses, context_presses) -> list[dict]:
    configs = [TRANSFORMERS_FULL]
    for budget in budgets:
        configs += [{"policy": "kvpress", "press": p, "budget": budget} for p in presses]
        configs += [{"policy": "kvpress", "press": p, "budget": budget, "scope": "context"} for p in context_presses]
    return configs


def launch_press(config: dict, prompts_file: Path, args, model: Path) -> dict:
    command = [
        args.kvpress_python, str(HERE / "kvpress_baselines.py"),
        "--config", json.dumps(config),
        "--model-path", str(model),
        "--prompts-file", str(prompts_file),
        "--max-new-tokens", str(args.max_new_tokens),
        "--dtype", args.dtype,
    ]  # fmt: skip
    return run_child(config, command, dict(os.environ), args.log_dir)


def _interval(value) -> str:
    mean, low, high = value
    verdict = " **above 0**" if low > 0 else " **below 0**" if high < 0 else ""
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]{verdict}"


def markdown(rows: list[dict], budgets, header: str) -> str:
    lines = [header, ""]
    lines += [
        "| configuration | ROUGE-L vs vLLM full (mean ± s.e.) | needles | identical | Δ ROUGE-L vs our default [95% CI] | Δ needles vs our default [95% CI] | generate s |",
        "|---|---|---|---|---|---|---|",
    ]
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | FAILED: {row['error']} | | | | | |")
            continue
        ours = by_name.get(config_name(our_default(row["budget"]))) if "budget" in row else None
        compared = paired(row, ours) if ours is not None and ours is not row and "error" not in ours else None
        name = f"**{row['name']}** (ours)" if ours is row else row["name"]
        rouge = "1.000 (reference)" if row["config"] == REFERENCE else f"{row['rouge_mean']:.3f} ± {row['rouge_sem']:.3f}"
        lines.append(
            f"| {name} | {rouge} "
            f"| {row['needle_hits']}/{row['needle_n']} | {row['identical']}/{row['n']} "
            f"| {_interval(compared['rouge']) if compared else '-'} "
            f"| {_interval(compared['needle']) if compared and compared['needle'] else '-'} | {row['generate_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], budgets, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, budget in zip(axes, budgets):
        members = [r for r in rows if "error" not in r and math.isclose(r.get("budget", -1), budget)]
        names = [r["name"].rsplit("@", 1)[0] + (" (context)" if r.get("scope") == "context" else "") for r in members]
        colors = ["#e7298a" if r["policy"] == "prefixkv" else "#7570b3" for r in members]
        ax.barh(range(len(members)), [r["rouge_mean"] for r in members], xerr=[r["rouge_sem"] for r in members], color=colors, capsize=2)
        ax.set_yticks(range(len(members)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("ROUGE-L F1 vs vLLM's full-cache answer")
        ax.set_title(f"budget {budget:g}", fontsize=10)
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kvpress-python", required=True, help="the python of scripts/setup_kvpress_env.sh")
    parser.add_argument("--model", choices=DEMO_MODELS, default=DEMO_MODELS[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=PRESSES)
    parser.add_argument("--context-presses", nargs="*", default=["snapkv"], choices=PRESSES, help="also run these with kvpress's default scope: the document compressed before the question (none: no value)")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--min-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=2500)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="prompt builder seed")
    parser.add_argument("--dtype", default=serving_dtype(), help=f"both engines' dtype (default: {serving_dtype()}, as {describe()})")
    parser.add_argument("--kv-space-gib", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--reserved-cpus", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefixkv-bench-logs")
    parser.add_argument("--resume", action="store_true", help="keep the configurations already in the JSON file for the same prompts")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from benchmarks.prompts import build_prompts
    from prefixkv_vllm.calibration import DOCUMENT_MODULES
    from prefixkv_vllm.tools.demo_model import model_path

    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    built = build_prompts(tokenizer, args.num_prompts, args.min_tokens, args.max_tokens, seed=args.seed, exclude=DOCUMENT_MODULES)
    prompts = [{"kind": p.kind, "needle": p.needle, "prompt_token_ids": p.prompt_token_ids} for p in built]
    prompts_file = args.log_dir / "kvpress-prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    json_path = args.out_dir / f"kvpress-{args.model}.json"
    previous = saved_results(json_path, prompts, args.max_new_tokens) if args.resume else {}
    lengths = [len(p["prompt_token_ids"]) for p in prompts]
    ours = [REFERENCE] + [our_default(b) for b in args.budgets]
    results, reused = [], []
    begun = time.time()
    for config in ours + press_configs(args.budgets, args.presses, args.context_presses):
        key = json.dumps(config, sort_keys=True)
        if key in previous:
            reused.append(config_name(config))
        else:
            if config["policy"] == "kvpress":
                previous[key] = launch_press(config, prompts_file, args, model)
            else:
                previous[key] = launch(config, prompts_file, args, args.log_dir)
            print(f"[kvpress] {config_name(config)}: {previous[key].get('error', '').splitlines()[:1] or 'done'}", flush=True)
        results.append(previous[key])
        # Answers saved by earlier runs with other presses stay in the file (a run with a subset
        # of presses once dropped them).
        used = {json.dumps(r["config"], sort_keys=True) for r in results}
        kept = [r for k, r in previous.items() if k not in used]
        json_path.write_text(json.dumps({"prompt_lengths": lengths, "max_new_tokens": args.max_new_tokens, "results": results + kept}, indent=1))
    rows = [dict(row, config=result["config"]) for row, result in zip(score(results, prompts), results)]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    header = (
        f"# {args.model}: our default against kvpress's presses ({time.strftime('%Y-%m-%d')}, {args.dtype}, {describe()})\n\n"
        f"Command: `{command}` ({(time.time() - begun) / 60:.0f} min this run"
        + (f"; answers of earlier runs with the same prompts reused for: {', '.join(reused)}" if reused else "")
        + f"). {len(prompts)} prompts of "
        f"{min(lengths)}-{max(lengths)} tokens, none from the calibration's modules, {args.max_new_tokens} tokens greedy. "
        "Presses compress the whole prompt, question included, as our server does (on a hybrid model only the "
        "full-attention layers, as our server does), unless marked *context only* "
        "(kvpress's default: the document before the question is seen). Budget = share of the prompt's KV cache kept "
        "(kvpress `compression_ratio` = 1 - budget)."
    )
    (args.out_dir / f"kvpress-{args.model}.md").write_text(markdown(rows, args.budgets, header))
    plot(rows, args.budgets, args.out_dir / f"kvpress-{args.model}.png", f"{args.model}: ROUGE-L vs the full cache, {len(prompts)} prompts")
    print(markdown(rows, args.budgets, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

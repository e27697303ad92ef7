"""Answer quality under KV eviction: every policy x scorer against the full cache.

For each budget, runs ``uniform`` and ``prefixkv`` with each scorer (``raw``,
``mean``, ``window``, ``snapkv``), ``prefixkv`` with each ``--profiles`` profile
(e.g. from ``prefixkv calibrate --criterion loss``) and ``streaming`` (which reads
no attention, so once), plus the full cache (``--kv-policy none``, stock vLLM) as
the reference. Every configuration decodes the same prompts greedily in one
``llm.generate`` call, in its own subprocess (one vLLM engine per process).
Metrics per configuration:

* ROUGE-L F1 of each answer against the full-cache answer (``rouge-score``'s
  ``rougeL``), mean and standard error over prompts;
* needle accuracy: the answer contains the needle (pass key or badge number);
  the full cache's own needle accuracy is the ceiling to compare against;
* identical: answers equal to the full-cache answer, token for token.

Every configuration is also compared with ``uniform`` at the same budget (same
scorer where that was run) prompt by prompt: the mean paired difference in
ROUGE-L and in needle accuracy, with a 95% bootstrap interval over prompts, so
that "beats" means an interval above zero.

Every engine runs in ``--dtype`` (default: what this CPU serves fastest, ``machine.py``).
``--kv-cache-dtypes auto fp8`` also runs every configuration, the full cache included,
with an fp8 KV cache; the reference stays the full cache in the model's dtype.

Writes ``quality.md`` (tables), ``quality.png`` (grouped bars) and ``quality.json``
(every answer) under ``--out-dir``, and prints the tables.

    python benchmarks/quality.py --budgets 0.2 0.5 --num-prompts 48
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/NAME.py`: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe, serving_dtype  # noqa: E402
from benchmarks.serving import stop_process_group, vllm_version  # noqa: E402
from prefixkv_vllm.config import PrefixKVConfig  # noqa: E402
from prefixkv_vllm.policy import CRITERIA  # noqa: E402
from prefixkv_vllm.policy.paged import DECODE_MODES  # noqa: E402
from prefixkv_vllm.tools.demo_model import DEMO_MODELS  # noqa: E402

SCORERS = ("raw", "mean", "window", "snapkv")
BOOTSTRAP_SAMPLES = 10_000
DEFAULT_SCORER = PrefixKVConfig.scorer  # the server's default --kv-scorer
POLICIES = ("uniform", "prefixkv", "streaming")
REFERENCE = {"policy": "none"}  # the full cache in the model's dtype: what every answer is compared with


# --- metrics -------------------------------------------------------------------


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (``rouge-score``: lower-cased alphanumeric tokens); two answers without tokens match perfectly."""
    from rouge_score import rouge_scorer, tokenize

    if not tokenize.tokenize(candidate, None) and not tokenize.tokenize(reference, None):
        return 1.0  # rouge-score gives 0 here; an empty answer where the full cache gave one is a perfect match
    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, candidate)["rougeL"].fmeasure


def paired_interval(differences: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-prompt paired differences and its 95% percentile-bootstrap interval (resampling prompts)."""
    import numpy as np

    values = np.asarray(differences, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))
    low, high = np.percentile(values[draws].mean(axis=1), [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def mean_sem(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


# --- configurations ------------------------------------------------------------


def config_name(config: dict) -> str:
    if config["policy"] == "kvpress":  # benchmarks/kvpress_compare.py
        if config["press"] == "none":
            return "full cache (transformers)"
        scope = " (context only)" if config.get("scope") == "context" else ""
        return f"kvpress {config['press']}@{config['budget']:g}{scope}"
    cache = f", {config['cache']} KV" if "cache" in config else ""
    if config["policy"] == "none":
        return f"full cache{cache}"
    scorer = "recency" if config["policy"] == "streaming" else config["scorer"]
    decode = f" decode {config['decode']}" if "decode" in config else ""
    if "interval" in config:
        decode += f" every {config['interval']}"
    return f"{policy_label(config)}/{scorer}@{config['budget']:g}{decode}{cache}"


def policy_label(config: dict) -> str:
    """The policy, with the calibration criterion of its profile, or the one it was given, where it has one."""
    if "profile" in config:
        # The file's name tells two profiles of one criterion apart in a table.
        label = f"{config['policy']} ({config['criterion']} profile {Path(config['profile']).stem})"
    elif "criterion" in config:
        label = f"{config['policy']} ({config['criterion']} criterion)"
    else:
        label = config["policy"]
    if "tiers" in config:
        label += f", {config['tiers']} tiers"
    return f"{label} +prefix caching" if config.get("prefix_caching") else label


def configurations(budgets, policies, scorers, recent=1, decode_modes=("fifo",), profiles=(), criteria=(), tiers=(), intervals=()) -> list[dict]:
    """``profiles``: ``(path, scorer, criterion, budgets)`` per profile; it runs at the budgets it has.

    ``criteria``: start-up calibration criteria for ``prefixkv`` (``--kv-criterion``); none: the server's
    default. Only another criterion than the default is named in a configuration, so the default's
    results are the same configuration however they were asked for. ``tiers``: ``--kv-tiers`` counts
    for ``prefixkv``, named the same way (the default, one group per layer, is not). ``intervals``:
    ``--kv-decode-interval`` values for every decode mode that evicts, named the same way.
    """
    configs = [{"policy": "none"}]
    for budget in budgets:
        for policy in policies:
            for scorer in ["recency"] if policy == "streaming" else scorers:
                for criterion, tier_count in _prefixkv_variants(policy, criteria, tiers):
                    for decode, interval in _decode_variants(decode_modes, intervals):
                        config = {"policy": policy, "budget": budget}
                        if recent != 1:  # results saved before kv_recent was a setting ran at 1 and have no key
                            config["recent"] = recent
                        if policy != "streaming":
                            config["scorer"] = scorer
                        if criterion not in (None, PrefixKVConfig.criterion):
                            config["criterion"] = criterion
                        if tier_count not in (None, PrefixKVConfig.tiers):
                            config["tiers"] = tier_count
                        if len(decode_modes) > 1 or decode != "fifo":
                            config["decode"] = decode
                        if interval not in (None, PrefixKVConfig.decode_interval):
                            config["interval"] = interval
                        configs.append(config)
        for path, scorer, criterion, profile_budgets in profiles:
            if not any(math.isclose(budget, b) for b in profile_budgets):
                continue
            for decode in decode_modes:
                config = {"policy": "prefixkv", "budget": budget, "scorer": scorer, "profile": str(path), "criterion": criterion}
                if recent != 1:
                    config["recent"] = recent
                if len(decode_modes) > 1 or decode != "fifo":
                    config["decode"] = decode
                configs.append(config)
    return configs


def _decode_variants(decode_modes, intervals):
    return [(d, i) for d in decode_modes for i in ([None] if d == "off" else intervals or [None])]


def _prefixkv_variants(policy, criteria, tiers):
    if policy != "prefixkv":
        return [(None, None)]
    return [(c, t) for c in (criteria or [None]) for t in (tiers or [None])]


def additional_config(config: dict) -> dict:
    if config["policy"] == "none":
        return {}
    extra = {"kv_policy": config["policy"], "kv_budget": config["budget"], "kv_recent": config.get("recent", 1)}
    if "decode" in config:
        extra["kv_decode"] = config["decode"]
    if "tiers" in config:
        extra["kv_tiers"] = config["tiers"]
    if "interval" in config:
        extra["kv_decode_interval"] = config["interval"]
    if "scorer" in config:
        extra["kv_scorer"] = config["scorer"]
    if "profile" in config:
        extra["kv_profile"] = config["profile"]
    elif "criterion" in config:
        extra["kv_criterion"] = config["criterion"]
    return extra


# --- one configuration, in a subprocess -----------------------------------------


def run_config(args) -> None:
    """Child process: one engine, every prompt in one generate call, answers to JSON."""
    from vllm import LLM, SamplingParams

    from prefixkv_vllm.tools.demo_model import model_path

    config = json.loads(args.run_config)
    prompts = json.loads(Path(args.prompts_file).read_text())
    started = time.time()
    llm = LLM(
        str(model_path(args.model)),
        dtype=args.dtype,
        kv_cache_dtype=config.get("cache", "auto"),
        enforce_eager=True,
        block_size=32,
        enable_prefix_caching=config.get("prefix_caching", False),
        max_model_len=args.max_model_len,
        seed=0,
        additional_config=additional_config(config),
    )
    startup_s = time.time() - started
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    started = time.time()
    outputs = llm.generate([{"prompt_token_ids": p["prompt_token_ids"]} for p in prompts], params, use_tqdm=False)
    generate_s = time.time() - started
    answers = [o.outputs[0].text for o in outputs]
    tokens = [len(o.outputs[0].token_ids) for o in outputs]
    Path(args.result_file).write_text(
        json.dumps({"answers": answers, "output_tokens": tokens, "startup_s": startup_s, "generate_s": generate_s})
    )


def launch(config: dict, prompts_file: Path, args, log_dir: Path) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()),
        "--run-config", json.dumps(config),
        "--prompts-file", str(prompts_file),
        "--max-new-tokens", str(args.max_new_tokens),
        "--max-model-len", str(args.max_model_len),
        "--model", args.model,
        "--dtype", args.dtype,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib)}
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(args.reserved_cpus))
    return run_child(config, command, env, log_dir)


def run_child(config: dict, command: list[str], env: dict, log_dir: Path) -> dict:
    """Runs ``command --result-file F`` (one configuration) with its output in a log; its answers, or the error."""
    from benchmarks.prompts import CpuMeter

    result_file = Path(tempfile.mkstemp(suffix=".json", prefix="quality-")[1])
    command = [*command, "--result-file", str(result_file)]
    log_path = log_dir / (re.sub(r"[^A-Za-z0-9_.@-]+", "_", config_name(config)) + ".log")
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            meter = CpuMeter(process.pid)
            while process.poll() is None:
                meter.sample()
                time.sleep(0.5)
        finally:  # interrupted: take the engine processes down with us
            if process.poll() is None:
                stop_process_group(process, timeout=30)
    wall_s = time.time() - started
    cpu = meter.result()
    log_text = log_path.read_text(errors="replace")
    plan = next((line.split("PrefixKV: ", 1)[1] for line in log_text.splitlines() if "keep ratios per layer" in line), None)
    if process.returncode != 0:
        tail = "\n".join(log_text.splitlines()[-25:])
        return {"config": config, "error": f"exit {process.returncode}; log {log_path}:\n{tail}", "wall_s": wall_s, "plan": plan, "cpu": cpu}
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return {"config": config, **result, "wall_s": wall_s, "plan": plan, "log": str(log_path), "cpu": cpu}


# --- report --------------------------------------------------------------------


def score(results: list[dict], prompts: list[dict]) -> list[dict]:
    from benchmarks.prompts import answer_contains

    reference = next(r for r in results if r["config"] == REFERENCE)
    rows = []
    for result in results:
        row = {"name": config_name(result["config"]), **result["config"], "wall_s": result.get("wall_s")}
        if "error" in result:
            row["error"] = result["error"].splitlines()[0]
            rows.append(row)
            continue
        rouge = [rouge_l_f1(a, r) for a, r in zip(result["answers"], reference["answers"])]
        needles = [(p, a) for p, a in zip(prompts, result["answers"]) if p["needle"]]
        hits = sum(answer_contains(a, p["needle"]) for p, a in needles)
        # needles the full cache itself found: how many of those survive eviction
        found = [(p, a) for p, a, r in zip(prompts, result["answers"], reference["answers"]) if p["needle"] and answer_contains(r, p["needle"])]
        row.update(
            rouge_per_prompt=rouge,
            needle_per_prompt=[int(answer_contains(a, p["needle"])) for p, a in needles],
            rouge_mean=mean_sem(rouge)[0],
            rouge_sem=mean_sem(rouge)[1],
            rouge_by_kind={k: mean_sem([r for r, p in zip(rouge, prompts) if p["kind"] == k])[0] for k in sorted({p["kind"] for p in prompts})},
            needle_hits=hits,
            needle_n=len(needles),
            kept_hits=sum(answer_contains(a, p["needle"]) for p, a in found),
            kept_n=len(found),
            identical=sum(a == r for a, r in zip(result["answers"], reference["answers"])),
            n=len(rouge),
            generate_s=result["generate_s"],
            foreign_share=result.get("cpu", {}).get("foreign_share", float("nan")),
        )
        rows.append(row)
    return rows


def baseline_for(row: dict, rows: list[dict]) -> dict | None:
    """The ``uniform`` row a configuration is compared with, at the same budget and decode mode and interval.

    ``uniform`` with the same scorer where it ran, so that only the allocation
    differs; else (other ``uniform`` rows, ``streaming``) ``uniform`` with the
    server's default scorer, so that only the scorer differs. None if neither ran.
    """
    if row["policy"] == "none" or "error" in row:
        return None
    candidates = [
        r for r in rows
        if r["policy"] == "uniform" and r is not row and "error" not in r
        and math.isclose(r["budget"], row["budget"]) and _same_decode(r, row)
    ]  # fmt: skip
    for scorer in (row.get("scorer"), DEFAULT_SCORER):
        match = [r for r in candidates if r["scorer"] == scorer]
        if match:
            return match[0]
    return None


def _same_decode(a: dict, b: dict) -> bool:
    return a.get("decode") == b.get("decode") and a.get("interval") == b.get("interval")


def best_uniform(row: dict, rows: list[dict]) -> dict | None:
    """The ``uniform`` row with the highest mean ROUGE-L at the row's budget and decode mode and interval (its best scorer)."""
    candidates = [
        r for r in rows
        if r["policy"] == "uniform" and "error" not in r
        and math.isclose(r["budget"], row["budget"]) and _same_decode(r, row)
    ]  # fmt: skip
    return max(candidates, key=lambda r: r["rouge_mean"], default=None)


def comparisons(rows: list[dict]) -> list[dict]:
    """Paired per-prompt differences against ``uniform``, with 95% bootstrap intervals.

    Every configuration against its ``baseline_for``; ``prefixkv`` rows also against
    ``uniform`` with its best scorer, where that is another row.
    """
    pairs = []
    for row in rows:
        baseline = baseline_for(row, rows)
        if baseline is None:
            continue
        pairs.append((row, baseline))
        best = best_uniform(row, rows) if row["policy"] == "prefixkv" else None
        if best is not None and best is not baseline:
            pairs.append((row, best))
    return [
        {"name": row["name"], "baseline": baseline["name"], "n": len(row["rouge_per_prompt"]),
         "needle_n": len(row["needle_per_prompt"]), **paired(row, baseline)}
        for row, baseline in pairs
    ]


def paired(row: dict, baseline: dict) -> dict:
    """Per-prompt differences of ``row`` from ``baseline``: ``paired_interval`` of ROUGE-L and of needle hits."""
    rouge = [a - b for a, b in zip(row["rouge_per_prompt"], baseline["rouge_per_prompt"])]
    needle = [a - b for a, b in zip(row["needle_per_prompt"], baseline["needle_per_prompt"])]
    return {"rouge": paired_interval(rouge), "needle": paired_interval(needle) if needle else None}


def saved_results(json_path: Path, prompts: list[dict], max_new_tokens: int) -> dict[str, dict]:
    """The successful results of an earlier run in ``json_path`` with the same prompts and answer length, by configuration."""
    if not json_path.exists():
        return {}
    saved = json.loads(json_path.read_text())
    same = saved.get("prompt_lengths") == [len(p["prompt_token_ids"]) for p in prompts] and saved.get("max_new_tokens") == max_new_tokens
    return {json.dumps(r["config"], sort_keys=True): r for r in saved["results"] if "error" not in r} if same else {}


def _interval(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return "-"
    mean, low, high = value
    verdict = " (above 0)" if low > 0 else " (below 0)" if high < 0 else ""
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]{verdict}"


def comparison_lines(compared: list[dict]) -> list[str]:
    """Table rows for ``comparisons``: configuration, baseline, Δ ROUGE-L, Δ needle accuracy."""
    return [
        f"| {c['name']} | {c['baseline']} | {_interval(c['rouge'])} (n={c['n']}) | {_interval(c['needle'])} (n={c['needle_n']}) |"
        for c in compared
    ]


def markdown(rows, prompts, args, header) -> str:
    kinds = sorted({p["kind"] for p in prompts})
    lines = [header, ""]
    lines.append(
        "| policy | scorer | budget | ROUGE-L F1 vs full (mean ± s.e.) | needle accuracy | needles the full cache found, still found | identical answers | n | "
        + " | ".join(f"ROUGE-L {k}" for k in kinds)
        + " | generate s | other jobs' CPU share |"
    )
    lines.append("|" + "---|" * (10 + len(kinds)))
    for row in rows:
        policy = policy_label(row)
        scorer = "-" if row["policy"] == "none" else ("recency" if row["policy"] == "streaming" else row["scorer"])
        budget = "1.0" if row["policy"] == "none" else f"{row['budget']:g}"
        if "error" in row:
            lines.append(f"| {policy} | {scorer} | {budget} | FAILED: {row['error']} |" + " |" * (8 + len(kinds)))
            continue
        reference = row["policy"] == "none" and "cache" not in row
        rouge = "1.000 (reference)" if reference else f"{row['rouge_mean']:.3f} ± {row['rouge_sem']:.3f}"
        label = f"{policy}, decode {row['decode']}" if "decode" in row else policy
        if "interval" in row:
            label += f" every {row['interval']}"
        if "cache" in row:
            label += f", {row['cache']} KV cache"
        lines.append(
            f"| {label} | {scorer} | {budget} | {rouge} | {row['needle_hits']}/{row['needle_n']} "
            f"({row['needle_hits'] / max(1, row['needle_n']):.0%}) | {row['kept_hits']}/{row['kept_n']} | {row['identical']}/{row['n']} | {row['n']} | "
            + " | ".join(f"{row['rouge_by_kind'][k]:.2f}" for k in kinds)
            + f" | {row['generate_s']:.0f} | {row['foreign_share']:.0%} |"
        )
    compared = comparisons(rows)
    if compared:
        lines += [
            "",
            "Paired against `uniform` at the same budget (same scorer; a `uniform` or `streaming` row: against the default "
            f"`{DEFAULT_SCORER}` scorer; `prefixkv` also against `uniform` with its best scorer by mean ROUGE-L), prompt by prompt "
            "(mean difference [95% bootstrap interval over prompts, "
            f"{BOOTSTRAP_SAMPLES} resamples]; *above 0* / *below 0*: the whole interval is):",
            "",
            "| configuration | compared with | Δ ROUGE-L (all prompts) | Δ needle accuracy (needle prompts) |",
            "|---|---|---|---|",
        ]
        lines += comparison_lines(compared)
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, budgets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["policy"] == "none" and "error" not in r)
    full_acc = full["needle_hits"] / max(1, full["needle_n"])
    colors = {"raw": "#d95f02", "mean": "#7570b3", "window": "#1b9e77", "snapkv": "#e7298a", "recency": "#999999"}
    labels = list(dict.fromkeys(policy_label(r) for r in rows if r["policy"] != "none"))
    groups = [(b, label) for b in budgets for label in labels]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, metric in zip(axes, ("rouge", "needle")):
        for gi, (budget, label) in enumerate(groups):
            members = [r for r in rows if r["policy"] != "none" and policy_label(r) == label and r["budget"] == budget and "error" not in r]
            width = 0.8 / max(1, len(members))
            for mi, row in enumerate(members):
                scorer = "recency" if row["policy"] == "streaming" else row["scorer"]
                x = gi + (mi - (len(members) - 1) / 2) * width
                if metric == "rouge":
                    ax.bar(x, row["rouge_mean"], width * 0.92, yerr=row["rouge_sem"], color=colors[scorer], capsize=2)
                else:
                    ax.bar(x, row["needle_hits"] / max(1, row["needle_n"]), width * 0.92, color=colors[scorer])
        ax.set_xticks(range(len(groups)), [f"{label.replace(' (', chr(10) + '(')}\n@{b:g}" for b, label in groups], fontsize=7)
        if metric == "rouge":
            ax.set_ylabel("ROUGE-L F1 vs full-cache answer")
            ax.set_ylim(0, 1)
        else:
            ax.axhline(full_acc, color="black", linestyle="--", linewidth=1)
            ax.text(len(groups) - 0.5, full_acc, f"full cache {full_acc:.0%}", ha="right", va="bottom", fontsize=8)
            ax.set_ylabel("needle accuracy")
            ax.set_ylim(0, 1.05)
    used = [s for s in colors if any(r["policy"] != "none" and ("recency" if r["policy"] == "streaming" else r["scorer"]) == s for r in rows)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in used]
    fig.legend(handles, used, title="scorer", loc="upper right", ncol=len(used), fontsize=8)
    fig.suptitle(f"PrefixKV on SmolLM2-135M-Instruct (vLLM CPU): answers vs full cache, n={full['n']} prompts", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-tokens", type=int, default=1000, help="shortest prompt (tokens, template included)")
    parser.add_argument("--max-tokens", type=int, default=2500, help="longest prompt")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    parser.add_argument("--profiles", nargs="+", type=Path, default=[], metavar="PROFILE", help="also run prefixkv with each profile (`prefixkv calibrate`), with its scorer, at the budgets it has")
    parser.add_argument("--criteria", nargs="+", default=[], choices=CRITERIA, help="run prefixkv with each start-up calibration criterion (--kv-criterion; default: the server's)")
    parser.add_argument("--seed", type=int, default=0, help="prompt builder seed")
    parser.add_argument("--recent", type=int, default=PrefixKVConfig.recent, help=f"kv_recent: last prompt tokens always kept (default: the server's, {PrefixKVConfig.recent}; the paper: 1)")
    parser.add_argument("--kv-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for every engine")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default=serving_dtype(), help=f"every engine's dtype (default: {serving_dtype()}, as {describe()})")
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], help="run every configuration with each KV-cache dtype (e.g. auto fp8); the reference is the full cache with auto")
    parser.add_argument("--reserved-cpus", type=int, default=0, help="VLLM_CPU_NUM_OF_RESERVED_CPU unless set in the environment (vLLM default 1: on 2 cores the model runs on one thread)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefixkv-bench-logs")
    parser.add_argument("--tiers", nargs="+", type=int, default=[], help="run prefixkv with each --kv-tiers count (0: one KV-cache group per layer, the server's default)")
    parser.add_argument("--decode", nargs="+", default=["fifo"], choices=DECODE_MODES, help=f"--kv-decode modes (compare them with a --max-new-tokens above the round interval, {PrefixKVConfig.decode_interval} tokens by default)")
    parser.add_argument("--intervals", nargs="+", type=int, default=[], help=f"--kv-decode-interval values for each evicting decode mode (default: the server's, {PrefixKVConfig.decode_interval})")
    parser.add_argument("--kinds", nargs="+", help="only these prompt kinds (benchmarks/prompts.py KINDS), e.g. summary for long outputs")
    parser.add_argument("--stem", default="quality", help="output file names: STEM.md, STEM.json, STEM.png")
    parser.add_argument("--prefix-caching", action="store_true", help="also run each compressed configuration with vLLM's prefix caching on (each prompt is new, so this measures what the write-once prefix costs)")
    parser.add_argument("--resume", action="store_true", help="keep the configurations already in OUT_DIR/STEM.json with the same prompts and add this run's (a run in steps)")
    # internal: one configuration in a child process
    parser.add_argument("--model", choices=DEMO_MODELS, default=DEMO_MODELS[0], help="demo model (`prefixkv demo-model --name`)")
    parser.add_argument("--run-config", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_config:
        run_config(args)
        return 0

    from transformers import AutoTokenizer

    from benchmarks.prompts import build_prompts
    from prefixkv_vllm.tools.demo_model import model_path

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up in launch()
    begun = time.time()
    command_line = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts = [
        {"kind": p.kind, "needle": p.needle, "depth": p.depth, "source": p.source, "prompt_token_ids": p.prompt_token_ids}
        for p in build_prompts(tokenizer, args.num_prompts, args.min_tokens, args.max_tokens, seed=args.seed)
        if not args.kinds or p.kind in args.kinds
    ]
    prompts_file = args.log_dir / "quality-prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    json_path = args.out_dir / f"{args.stem}.json"
    previous = saved_results(json_path, prompts, args.max_new_tokens) if args.resume else {}
    results = []
    from prefixkv_vllm.policy import Profile

    profiles = []
    for path in args.profiles:
        profile = Profile.load(path)
        profiles.append((path.resolve(), profile.scorer, profile.provenance.get("criterion", "attention"), tuple(profile.entries)))
    configs = configurations(args.budgets, args.policies, args.scorers, args.recent, args.decode, profiles, args.criteria, args.tiers, args.intervals)
    if args.prefix_caching:
        configs += [dict(c, prefix_caching=True) for c in configs if c["policy"] != "none"]
    # "auto" adds no key: the reference and saved results keep their names.
    configs = [c if cache == "auto" else {**c, "cache": cache} for cache in args.kv_cache_dtypes for c in configs]
    if REFERENCE not in configs:
        configs.insert(0, REFERENCE)
    for config in configs:
        key = json.dumps(config, sort_keys=True)
        if key in previous:
            print(f"[quality] {config_name(config)}: reused from {json_path}", flush=True)
            results.append(previous.pop(key))
            continue
        print(f"[quality] {config_name(config)} ...", end=" ", flush=True)
        result = launch(config, prompts_file, args, args.log_dir)
        results.append(result)
        print("FAILED" if "error" in result else f"{result['wall_s']:.0f} s (generate {result['generate_s']:.0f} s)", flush=True)
        if "error" in result:
            print(result["error"], file=sys.stderr, flush=True)
        if config["policy"] == "none" and "error" in result:
            print("[quality] the full-cache reference failed; stopping", file=sys.stderr)
            return 1
    # Saved configurations this run did not list stay; the tables go by budget, then in the order run.
    results = sorted([*results, *previous.values()], key=lambda r: r["config"].get("budget", 0.0))
    total_s = time.time() - begun
    # With --resume, this run's time says little: the configurations' own wall times, reused ones included, do.
    configurations_s = sum(r.get("wall_s") or 0.0 for r in results)
    rows = score(results, prompts)
    lengths = [len(p["prompt_token_ids"]) for p in prompts]
    kinds = {k: sum(p["kind"] == k for p in prompts) for k in sorted({p["kind"] for p in prompts})}
    plans = sorted({r["plan"] for r in results if r.get("plan") and r["config"]["policy"] == "prefixkv"})
    header = "\n".join(
        [
            "# Quality: answers under KV eviction vs the full cache",
            "",
            f"- Command: `{command_line}`",
            f"- Date: {datetime.date.today().isoformat()}; device: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; "
            f"{vllm_version()}, {args.dtype} ({describe()}), eager, block size 32, prefix caching {'on only for rows marked +prefix caching' if args.prefix_caching else 'off'}, VLLM_CPU_KVCACHE_SPACE={args.kv_space_gib}, "
            f"VLLM_CPU_NUM_OF_RESERVED_CPU={os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU', args.reserved_cpus)}",
            f"- Model: `{model.name}` (`prefixkv demo-model --name {args.model}`), max_model_len {args.max_model_len}",
            f"- Prompts: {len(prompts)} built offline by `benchmarks/prompts.py` (seed {args.seed}): "
            + ", ".join(f"{n} {k}" for k, n in kinds.items())
            + f"; {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), chat template included",
            f"- Decoding: greedy (temperature 0), {args.max_new_tokens} new tokens max, all prompts in one `llm.generate` call per configuration",
            f"- Plugin settings: `kv_sink` 1, `kv_recent` {args.recent}, `kv_window` 32, per-layer selection; "
            "`prefixkv` without a profile: ratios calibrated at start-up with the same scorer and sink/recent, "
            f"cached, with the server's default criterion ({PrefixKVConfig.criterion}), or `prefixkv (C criterion)` with "
            "`--kv-criterion C`; `prefixkv (C profile NAME)`: ratios from the `prefixkv calibrate --criterion C` profile NAME.json (`--kv-profile`)",
            "- ROUGE-L: `rouge-score`'s rougeL F1 against the full-cache answer to the same prompt; s.e. = standard error over prompts. "
            "Needle accuracy: the answer contains the pass key / badge number.",
            "- *generate s*: wall time of the `llm.generate` call (prefill dominates on CPU). *Other jobs' CPU share*: CPU time "
            "that processes outside this benchmark took while the configuration ran, as a share of the machine "
            "(from /proc; this machine is shared, so compare timings only where it is near 0).",
            f"- Total run time: {total_s / 60:.1f} min; the configurations' wall times add up to {configurations_s / 60:.1f} min",
        ]
    )
    table = markdown(rows, prompts, args, header)
    if plans:
        table += "\nPer-layer keep ratios used by `prefixkv` (from the start-up log):\n\n" + "\n".join(f"- `{p}`" for p in plans) + "\n"
    (args.out_dir / f"{args.stem}.md").write_text(table)
    json_path.write_text(
        json.dumps(
            {
                "command": command_line,
                "prompt_lengths": lengths,
                "max_new_tokens": args.max_new_tokens,
                "prompts": [{k: v for k, v in p.items() if k != "prompt_token_ids"} for p in prompts],
                "results": results,
                "rows": rows,
                "comparisons": comparisons(rows),
            },
            indent=1,
        )
    )
    plot(rows, args.out_dir / f"{args.stem}.png", args.budgets)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pools runs of ``quality.py`` on different prompt sets (``--seed``) into one paired comparison.

A replication on new prompts is the honest test of a result already seen; pooling the
runs narrows the intervals. Configurations are matched by name; only those present in
every run are pooled. Each run's answers were scored against its own full-cache answers,
so the per-prompt ROUGE-L and needle values concatenate; the paired differences and
their bootstrap intervals are then ``quality.py``'s own. Writes ``STEM.md`` and
``STEM.json`` under ``--out-dir``.

    python benchmarks/quality_pool.py results/quality-default.json results/quality-default-seed1.json --stem quality-default-pooled
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/NAME.py`: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality import comparison_lines, comparisons, mean_sem  # noqa: E402

# Figures of one run, which do not pool as they are.
_PER_RUN = ("wall_s", "rouge_by_kind", "kept_hits", "kept_n", "identical", "n", "generate_s", "foreign_share")


def pool(runs: list[dict]) -> list[dict]:
    by_name = [{row["name"]: row for row in run["rows"] if "error" not in row} for run in runs]
    names = [name for name in by_name[0] if all(name in rows for rows in by_name[1:])]
    pooled = []
    for name in names:
        parts = [rows[name] for rows in by_name]
        # The configuration's own fields (what comparisons() matches baselines by), then the pooled metrics.
        row = {key: value for key, value in parts[0].items() if key not in _PER_RUN}
        row["rouge_per_prompt"] = [v for part in parts for v in part["rouge_per_prompt"]]
        row["needle_per_prompt"] = [v for part in parts for v in part["needle_per_prompt"]]
        row["rouge_mean"], row["rouge_sem"] = mean_sem(row["rouge_per_prompt"])
        row["needle_hits"], row["needle_n"] = sum(row["needle_per_prompt"]), len(row["needle_per_prompt"])
        row["per_run"] = [(part["rouge_mean"], part["needle_hits"], part["needle_n"]) for part in parts]
        pooled.append(row)
    return pooled


def markdown(rows: list[dict], sources: list[str]) -> str:
    lines = [
        "# Quality, pooled over prompt sets",
        "",
        "Runs pooled (`benchmarks/quality_pool.py`): " + ", ".join(f"`{s}`" for s in sources) + ".",
        "",
        "| configuration | n | ROUGE-L F1 vs full (mean ± s.e.) | needles | per run: ROUGE-L, needles |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if row["policy"] == "none":
            continue
        per_run = "; ".join(f"{rouge:.3f}, {hits}/{n}" for rouge, hits, n in row["per_run"])
        lines.append(f"| {row['name']} | {len(row['rouge_per_prompt'])} | {row['rouge_mean']:.3f} ± {row['rouge_sem']:.3f} | {row['needle_hits']}/{row['needle_n']} | {per_run} |")
    lines += ["", "| configuration | compared with | Δ ROUGE-L | Δ needle accuracy |", "|---|---|---|---|"]
    lines += comparison_lines(comparisons(rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quality.py JSON files, one per prompt set")
    parser.add_argument("--stem", default="quality-pooled")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    prompt_sets = [json.dumps(run["prompts"]) for run in runs]
    if len(set(prompt_sets)) < len(prompt_sets):
        parser.error("two of these runs decoded the same prompts; pool runs on different --seed values")
    rows = pool(runs)
    if not any(row["policy"] != "none" for row in rows):
        parser.error("no configuration ran in every one of these runs")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, [path.name for path in args.runs])
    (args.out_dir / f"{args.stem}.md").write_text(table)
    (args.out_dir / f"{args.stem}.json").write_text(json.dumps({"runs": [str(p) for p in args.runs], "rows": rows, "comparisons": comparisons(rows)}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``prefixkv calibrate``: write a profile for a model, print its ratios per layer, and plot them.

The command line of ``prefixkv_vllm.calibration`` (what it measures, on which
prompts): ``prefixkv calibrate MODEL --budget 0.2 0.5 -o profile.json`` writes a
profile, shows progress bars and prints the ratios per layer (and a loss profile's
costs); ``--plot`` draws them, ``--mix`` picks the calibration tasks. Its defaults
are the server's, so without options it writes the profile that ``vllm serve
--kv-policy prefixkv`` without ``--kv-profile`` calibrates at start-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..calibration import LOSS_POSITIONS, MAX_TOKENS, NUM_PROMPTS, SERVING, TASKS, calibrate
from ..policy import CRITERIA, SCORERS, Profile


def ratio_table(profile: Profile) -> str:
    """Kept ratio per compressed layer (rows) and budget (columns), as text; with the loss costs where measured."""
    budgets = sorted(profile.entries)
    criterion = profile.provenance.get("criterion", "attention")
    header = ["layer"] + [f"{criterion} @{b:g}" for b in budgets]
    costs = profile.costs
    if costs is not None:
        header += [f"KL @{r:g}" for r in costs.ratios]
    rows = []
    for position, layer in enumerate(profile.model.layers):
        row = [str(layer)] + [f"{profile.entries[b][position]:.3f}" for b in budgets]
        if costs is not None:
            row += [f"{v:.4f}" for v in costs.kl_per_layer[position]]
        rows.append(row)
    rows.append(["mean"] + [f"{sum(profile.entries[b]) / len(profile.entries[b]):.3f}" for b in budgets] + [""] * (len(header) - 1 - len(budgets)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows])


def plot_ratios(profiles: Sequence[Profile], path: str | Path) -> None:
    """Kept ratio per layer: one line per profile entry (criterion and budget), uniform dotted for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    budgets = sorted({b for p in profiles for b in p.entries})
    styles = ("-", "--", "-.", (0, (1, 1)))  # one per budget; one colour per profile
    for index, profile in enumerate(profiles):
        criterion = profile.provenance.get("criterion", "attention")
        tasks = "+".join(profile.provenance.get("tasks", ["documents"]))
        for budget, ratios in sorted(profile.entries.items()):
            ax.plot(
                profile.model.layers, ratios, color=f"C{index}", linestyle=styles[budgets.index(budget) % len(styles)],
                marker="o", markersize=3, label=f"{criterion} ({tasks}, {profile.scorer}) @{budget:g}",
            )  # fmt: skip
    for budget in budgets:
        ax.axhline(budget, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept ratio of the prompt's KV")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{profiles[0].model.name}: kept ratio per layer (dotted: uniform at the same budget)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tqdm_progress(items, description, total):
    from tqdm import tqdm

    # The inner loops (one per prompt) vanish when done; the prompts' bar stays.
    return tqdm(items, desc=description, total=total, leave=description == "calibration prompts", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefixkv calibrate", description="Write a PrefixKV profile for a model.")
    parser.add_argument("model", help="local Hugging Face checkpoint directory")
    parser.add_argument("--budget", type=float, nargs="+", default=[SERVING.budget], help=f"budgets to calibrate (default {SERVING.budget})")
    parser.add_argument("--scorer", default=SERVING.scorer, choices=list(SCORERS), help=f"token scorer (default {SERVING.scorer})")
    parser.add_argument("--window", type=int, default=SERVING.window, help=f"last prompt queries the scorer reads (default {SERVING.window})")
    parser.add_argument(
        "--criterion",
        default=SERVING.criterion,
        choices=CRITERIA,
        help="loss (default): share the budget where compressing a layer changes the output least (KL divergence); "
        "attention: every layer keeps the same share of its attention mass (the paper)",
    )
    parser.add_argument("--mix", nargs="+", default=list(TASKS), choices=TASKS, help="calibration tasks, cycled over the prompts (default: all)")
    parser.add_argument("--prompts", type=int, default=NUM_PROMPTS, help=f"calibration prompts (default {NUM_PROMPTS})")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"most tokens of each prompt (default {MAX_TOKENS})")
    parser.add_argument("--sink", type=int, default=SERVING.sink, help=f"loss criterion: first tokens always kept, as --kv-sink (default {SERVING.sink})")
    parser.add_argument("--recent", type=int, default=SERVING.recent, help=f"loss criterion: last prompt tokens always kept, as --kv-recent (default {SERVING.recent})")
    parser.add_argument("--positions", type=int, default=LOSS_POSITIONS, help=f"loss criterion: decoded tokens compared (default {LOSS_POSITIONS})")
    parser.add_argument(
        "--device", default="cpu",
        help="torch device to calibrate on, e.g. cuda (default cpu; a server without --kv-profile calibrates on "
        "the CPU at start-up, before vLLM takes the GPU, so calibrate large models here and pass --kv-profile)",
    )  # fmt: skip
    parser.add_argument("-o", "--output", required=True, help="profile JSON to write")
    parser.add_argument("--plot", metavar="PNG", help="also draw the kept ratio per layer (needs matplotlib)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="PROFILE", help="other profiles to draw beside this one in --plot")
    args = parser.parse_args(argv)
    if args.positions < 1:
        parser.error("--positions must be >= 1")
    others = [Profile.load(path) for path in args.compare]  # fail before the long part
    profile = calibrate(
        args.model,
        args.budget,
        scorer=args.scorer,
        window=args.window,
        num_prompts=args.prompts,
        max_tokens=args.max_tokens,
        criterion=args.criterion,
        tasks=args.mix,
        sink=args.sink,
        recent=args.recent,
        positions=args.positions,
        device=args.device,
        progress=_tqdm_progress,
    )
    profile.save(args.output)
    print(ratio_table(profile))
    print(f"{args.output} ({profile.provenance['seconds']} s)")
    if args.plot:
        plot_ratios([profile, *others], args.plot)
        print(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

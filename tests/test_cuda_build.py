"""The CUDA sources compile for Hopper (sm_90a) with the local toolkit, GPU or not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("cuda/*.cu"))
NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def test_there_are_cuda_sources():
    assert {p.name for p in CUDA_SOURCES} >= {"importance.cu", "compact.cu"}


@pytest.mark.skipif(not Path(NVCC).exists(), reason="no CUDA toolkit (nvcc) on this machine")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90a(source, tmp_path):
    command = [
        NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"),
        "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=sm_90a",
        "-I", str(CSRC), "-Xcompiler", "-Wall", "-Werror", "all-warnings",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr

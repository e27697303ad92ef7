"""benchmarks/throughput.py --quick: vllm bench serve against stock and a compressed server on a small pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parent.parent


def test_quick_throughput_benchmark(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--out-dir", str(tmp_path), "--log-dir", str(tmp_path)]
    subprocess.run(command, check=True, timeout=1200, capture_output=True)
    rows = json.loads((tmp_path / "throughput-quick.json").read_text())
    stock, prefill, compressed = (next(r for r in rows if pred(r)) for pred in (
        lambda r: r["config"] == "stock" and not r.get("prefill_only"),
        lambda r: r.get("prefill_only"),
        lambda r: r["config"] != "stock",
    ))  # fmt: skip
    assert stock["completed"] == compressed["completed"] == 8
    assert stock["preemptions"] > 0  # the pool is too small for stock's admission
    assert compressed["preemptions"] == 0  # compression-aware admission
    assert all(r["usage_after"] == 0.0 for r in rows)
    assert prefill["duration_s"] < stock["duration_s"]
    table = (tmp_path / "throughput-quick.md").read_text()
    assert "Amdahl's bound" in table and "uniform@0.2 (fifo)" in table
    assert (tmp_path / "throughput-quick.png").stat().st_size > 0

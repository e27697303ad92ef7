"""benchmarks/throughput.py: --quick runs vllm bench serve against stock and a compressed
server on a small pool; the table's bounds are checked on made-up rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def row(config: str, duration: float, tok_s: float, **extra) -> dict:
    return {
        "config": config, "shape": "1024+512", "duration_s": duration, "output_tok_s": tok_s, "request_s": 0.1,
        "ttft_p50_ms": 1e3, "ttft_p99_ms": 2e3, "tpot_p50_ms": 100, "tpot_p99_ms": 200, "completed": 48,
        "max_running": 8, "preemptions": 0, "usage_mean": 0.5, "usage_max": 0.9, "usage_after": 0.0,
        "pool_tokens": 23_296, "pool_bytes": 1 << 30, **extra,
    }  # fmt: skip


def test_table_gives_ratios_and_both_bounds():
    from benchmarks.throughput import markdown

    rows = [
        row("stock", 100.0, 10.0, prefill_only=True, duration_s=25.0),
        row("stock", 100.0, 10.0),
        row("stock, pool for all (ceiling)", 50.0, 20.0, ceiling=True, pool_bytes=3 << 30),
        row("prefixkv@0.2 (fifo)", 80.0, 15.0),
    ]
    table = markdown(rows, "# header")
    assert "Amdahl's bound on any KV compression's gain: 4.00x" in table
    assert "(3072 MiB) gives 2.00x stock" in table
    assert "| prefixkv@0.2 (fifo) | 80.0 s | 15.0 | 1.50x |" in table


def test_tiers_reach_the_server_and_the_table():
    from benchmarks.throughput import config_args, config_name

    config = {"policy": "prefixkv", "budget": 0.2, "decode": "fifo", "tiers": 3}
    assert config_args(config)[-2:] == ["--kv-tiers", "3"] and config_name(config) == "prefixkv@0.2 (fifo, 3 tiers)"
    assert "--kv-tiers" not in config_args({"policy": "prefixkv", "budget": 0.2, "decode": "fifo"})


def test_intervals_reach_the_server_and_the_table():
    from benchmarks.throughput import config_args, config_name

    config = {"policy": "prefixkv", "budget": 0.2, "decode": "fifo", "interval": 32}
    args = config_args(config)
    assert args[args.index("--kv-decode-interval") + 1] == "32" and config_name(config) == "prefixkv@0.2 (fifo every 32)"
    assert "--kv-decode-interval" not in config_args({"policy": "prefixkv", "budget": 0.2, "decode": "fifo"})


def test_admissions_reach_the_server_and_the_table():
    from benchmarks.throughput import config_args, config_name

    config = {"policy": "prefixkv", "budget": 0.2, "decode": "fifo", "admission": "stock"}
    args = config_args(config)
    assert args[args.index("--kv-admission") + 1] == "stock" and config_name(config) == "prefixkv@0.2 (fifo, stock admission)"
    assert "--kv-admission" not in config_args({"policy": "prefixkv", "budget": 0.2, "decode": "fifo"})


def test_quick_throughput_benchmark(tmp_path):
    pytest.importorskip("vllm")
    command = [
        sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--no-amdahl",
        "--out-dir", str(tmp_path), "--log-dir", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=1200, capture_output=True)
    rows = json.loads((tmp_path / "throughput-quick.json").read_text())
    stock, compressed = (next(r for r in rows if r["config"] == name) for name in ("stock", "uniform@0.2 (fifo)"))
    assert stock["completed"] == compressed["completed"] == 8
    assert stock["preemptions"] > 0  # the pool is too small for stock's admission
    assert compressed["preemptions"] == 0  # compression-aware admission
    assert all(r["usage_after"] == 0.0 for r in rows)
    assert "| uniform@0.2 (fifo) |" in (tmp_path / "throughput-quick.md").read_text()
    assert (tmp_path / "throughput-quick.png").stat().st_size > 0

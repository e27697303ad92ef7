"""benchmarks/decode_profile.py: profiler events land in the right kind, and the table
gives each configuration's step time against stock's (made-up results; the real run
needs minutes per configuration)."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_profiler_events_are_sorted_by_kind():
    from benchmarks.decode_profile import kind

    assert kind("_C::onednn_mm") == "linear layers"
    assert kind("aten::addmm") == "linear layers"
    assert kind("_C::cpu_attention_with_kv_cache") == "attention kernel"
    assert kind("prefixkv::importance") == "prefixkv ops"
    assert kind("aten::add") == "other torch ops"


def test_table_gives_step_time_per_request_and_ratio_to_stock():
    from benchmarks.decode_profile import markdown

    def result(step_ms, python_ms):
        buckets = {"linear layers": 50.0, "attention kernel": step_ms - 80.0 - python_ms, "other torch ops": 30.0}
        return {
            "prefill_s": 10.0, "step_ms": step_ms, "profiled_step_ms": step_ms, "context": 1152,
            "buckets_ms": {**buckets, "Python and the rest": python_ms}, "top_ops_ms": [["_C::onednn_mm", 50.0]],
        }  # fmt: skip

    args = Namespace(batch=40, prompt_len=1024, warm=0, steps=128)
    table = markdown({"stock": result(400.0, 20.0), "prefixkv@0.2": result(200.0, 40.0)}, args, "python benchmarks/decode_profile.py")
    assert "| stock | 400.0 | 10.00 | 1.00x | 400.0 | 0.0 | 300.0 | 50.0 | 30.0 | 20.0 | 10.0 |" in table
    assert "| prefixkv@0.2 | 200.0 | 5.00 | 0.50x | 200.0 | 0.0 | 80.0 | 50.0 | 30.0 | 40.0 | 10.0 |" in table

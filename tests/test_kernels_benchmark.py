"""benchmarks/kernels.py runs end to end (tiny shapes on the CPU) and writes its report."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_kernel_benchmark_smoke_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import kernels

    kernels.main(["--device", "cpu", "--dtype", "float32", "--smoke", "--out-dir", str(tmp_path)])
    rows = [line for line in (tmp_path / "kernels.md").read_text().splitlines() if line.startswith("| tiny GQA")]
    # The single-prompt kernels, then the server's own calls for a batch of two over two layers.
    assert [row.split("|")[2].strip() for row in rows] == ["96", "200", "96 x 2", "200 x 2"]
    assert [row.split("|")[3].strip() for row in rows[2:]] == ["2", "2"]
    assert (tmp_path / "kernels.png").stat().st_size > 0
    sys.modules.pop("kernels", None)

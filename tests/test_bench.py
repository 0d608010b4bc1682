"""`make bench` runs and writes its report (figures are never asserted on: no timed tests).

Marked slow: it trains a few dozen tiny models. The fast tier tests the engine those figures come from.
"""

import json
import subprocess
import sys

import pytest

from cnnexp import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_bench_runs_on_a_tiny_configuration_and_writes_its_report(tmp_path, cifar_jpeg):
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench.py"), "--tiny", "--full",
                           "--data", str(cifar_jpeg), "--out", str(tmp_path / "bench")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert {"machine", "throughput", "trial_overhead", "pruning", "memory", "workers", "data"} <= set(report)
    assert report["workers"]["2"]["complete"] == report["workers"]["1"]["complete"] == 2
    ratios = [v["ratio_vs_bare"] for k, v in report["throughput"].items() if k != "bare model.fit (NumPy)"]
    assert ratios and all(0 < r < 10 for r in ratios)  # measured against the bare loop, not against itself
    assert report["pruning"]["without pruner"]["epochs"] >= report["pruning"]["median pruner"]["epochs"] >= 1
    assert len(report["memory"]["rss_mb_after_each"]) == report["memory"]["trials"]
    assert report["data"]["images"] == 60000

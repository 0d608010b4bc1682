"""`make bench` runs and writes its report (figures are never asserted on: no timed tests)."""

import json

from tests.conftest import run_cli


def test_bench_runs_on_a_tiny_configuration_and_writes_its_report(tmp_path, cifar_jpeg):
    proc = run_cli("cnnexp.bench", "--tiny", "--out", str(tmp_path / "bench"), cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert {"machine", "throughput", "trial_overhead", "pruning", "memory", "workers", "data"} <= set(report)
    assert report["workers"]["2"]["trials"] == report["workers"]["1"]["trials"] == 2
    assert report["throughput"]["bare model.fit (NumPy)"]["ratio_vs_bare"] == 1.0
    assert all(v["images_per_second"] > 0 for v in report["throughput"].values())
    assert report["pruning"]["without pruner"]["epochs"] > 0
    assert len(report["memory"]["rss_mb_after_each"]) == report["memory"]["trials"]
    assert report["data"]["images"] == 60000
    markdown = (tmp_path / "bench" / "report.md").read_text()
    assert "Training throughput" in markdown and "Per-trial overhead" in markdown

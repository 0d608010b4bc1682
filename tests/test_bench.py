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
    assert {"machine", "runs_per_hour", "time_to_answer", "fast_preset", "throughput", "trial_overhead", "pruning",
            "memory", "workers", "data"} <= set(report)
    assert report["workers"]["2"]["complete"] == report["workers"]["1"]["complete"] == 2
    runs = report["runs_per_hour"]  # every path trained every seed, above chance, and was timed
    assert {"today", "compile_once", "towers_2", "bare_fit"} <= set(runs)
    assert all(runs[p]["runs"] == runs["seeds"] and runs[p]["mean_test_accuracy"] > 0.1 and
               0 < runs[p]["in_training"] <= 1 for p in ("today", "compile_once", "towers_2", "bare_fit"))
    answer = report["time_to_answer"]
    for side in ("ours", "grid", "tpe"):  # every side trained and counted its images, and was scored
        assert answer[side]["images_trained"] > 0 and set(answer[side]["agrees"]) == {"kernel", "width",
                                                                                        "train.batch_size"}
    assert answer["compute_ratio_grid_over_ours"] == round(
        answer["grid"]["images_trained"] / answer["ours"]["images_trained"], 2)
    (preset,) = report["fast_preset"]["runs"].values()
    assert preset["curve"] and all(0 <= p["test_accuracy"] <= 1 for p in preset["curve"])
    assert (tmp_path / "bench" / "fast_preset.png").stat().st_size > 5000
    assert report["pruning"]["without pruner"]["epochs"] >= report["pruning"]["median pruner"]["epochs"] >= 1
    assert len(report["memory"]["rss_mb_after_each"]) == report["memory"]["trials"]
    from cnnexp.config import compose_config
    from cnnexp.data.load import load_raw

    raw = load_raw(compose_config(["dataset=folder", f"dataset.path={cifar_jpeg}"]).dataset)
    assert report["data"]["images"] == len(raw.y_train) + len(raw.y_test)

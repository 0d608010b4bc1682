"""Time to 85% and to 90%: the fast preset (`model=fast_cnn train=fast`) on full CIFAR-10.

Each target gets a run whose schedule fits its time (10 and 30 minutes of training here): a
one-cycle schedule ends where its accuracy is, so a run sized for 30 minutes says little about
minute 10. The number of epochs is read off the measured throughput (a 1-epoch timing run). After
every epoch the test split is scored (with the mirror average the preset uses) outside the timed
training, which gives the accuracy-against-time curve; the time to a target is the training time
of the first epoch that reaches it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

TARGETS = ((0.85, 600), (0.90, 1800))  # (accuracy, seconds of training the run is sized for)


def curve_callback(data, train_cfg, points: list):
    """After each epoch: (training seconds so far, test accuracy); the scoring itself is not timed."""
    from cnnexp.runtime import keras
    from cnnexp.train.fit import evaluate

    class Curve(keras().callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            trained = sum(point["epoch_seconds"] for point in points) + float((logs or {}).get("epoch_seconds", 0))
            _, accuracy = evaluate(self.model, data.x_test, data.y_test, train_cfg)
            points.append({"epoch": epoch + 1, "epoch_seconds": float((logs or {}).get("epoch_seconds", 0)),
                           "train_seconds": round(trained, 1), "test_accuracy": round(accuracy, 4)})
            print(f"  fast preset epoch {epoch + 1}: {trained:.0f} s of training, test accuracy {accuracy:.4f}",
                  flush=True)

    return Curve()


def run_preset(epochs: int, extra: list[str], tmp: Path) -> list[dict]:
    from cnnexp.config import compose_config
    from cnnexp.run import DatasetMemo, prepare, run

    overrides = ["model=fast_cnn", "train=fast", f"train.epochs={epochs}", "train.val_fraction=0", "train.verbose=0",
                 "tracking=off", *extra]
    cfg = compose_config(overrides)
    memo = DatasetMemo()
    _, data = prepare(cfg, validated=True, datasets=memo)
    points: list[dict] = []
    run(cfg, overrides=overrides, callbacks=[curve_callback(data, cfg.train, points)], validated=True, datasets=memo)
    return points


def images_per_second(extra: list[str], tmp: Path) -> float:
    from cnnexp.config import compose_config
    from cnnexp.run import run

    cfg = compose_config(["model=fast_cnn", "train=fast", "train.epochs=2", "train.val_fraction=0", "train.verbose=0",
                          "tracking=off", "dataset.train_limit=6000", "dataset.test_limit=500", *extra])
    return run(cfg, validated=True).metrics["images_per_second"]


def bench_fast_preset(tmp: Path, tiny: bool = False, extra: tuple[str, ...] = ()) -> dict:
    extra = [*extra, *(["dataset.train_limit=2000", "dataset.test_limit=500"] if tiny else [])]
    speed = images_per_second(list(extra), tmp)
    train_images = 2000 if tiny else 50000
    out = {"images_per_second": round(speed, 1), "runs": {}}
    for target, seconds in TARGETS:
        epochs = 1 if tiny else max(1, math.floor(seconds * speed / train_images))
        began = time.perf_counter()
        points = run_preset(epochs, list(extra), tmp)
        reached = next((p for p in points if p["test_accuracy"] >= target), None)
        out["runs"][f"{target:.0%}"] = {"budget_seconds": seconds, "epochs": epochs, "curve": points,
                                        "final_accuracy": points[-1]["test_accuracy"] if points else None,
                                        "time_to_target_s": reached["train_seconds"] if reached else None,
                                        "wall_seconds": round(time.perf_counter() - began, 1)}
        if tiny:
            break
    return out


def plot(part: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for run in part["runs"].values():
        xs = [p["train_seconds"] / 60 for p in run["curve"]]
        ax.plot(xs, [p["test_accuracy"] for p in run["curve"]], "o-",
                label=f"sized for {run['budget_seconds'] / 60:.0f} min ({run['epochs']} epochs)")
    for target, seconds in TARGETS:
        ax.axhline(target, color="#9a9a9a", lw=1, ls="--")
        ax.axvline(seconds / 60, color="#9a9a9a", lw=1, ls=":")
    ax.set_xlabel("minutes of training (2-core CPU)")
    ax.set_ylabel("test accuracy (mirror-averaged)")
    ax.set_title("fast preset on full CIFAR-10: accuracy against training time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(part: dict) -> list[str]:
    lines = ["## Fast preset: time to 85% and 90% on full CIFAR-10 (targets: 85% within 10 min, 90% within 30 min)",
             "", f"`model=fast_cnn train=fast`, {part['images_per_second']} training images/s here.", "",
             "| run | epochs | final test accuracy | time to target | wall |", "|---|---:|---:|---:|---:|"]
    for name, run in part["runs"].items():
        reached = f"{run['time_to_target_s'] / 60:.1f} min" if run["time_to_target_s"] else "not reached"
        lines.append(f"| to {name}, sized for {run['budget_seconds'] / 60:.0f} min | {run['epochs']} | "
                     f"{run['final_accuracy']} | {reached} | {run['wall_seconds'] / 60:.1f} min |")
    return [*lines, "", "Curve: fast_preset.png; the points: report.json."]


if __name__ == "__main__":
    print(json.dumps(bench_fast_preset(Path("/tmp"), tiny=True), indent=1))

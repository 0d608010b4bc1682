"""Time to answer: the designed, budgeted study against a naive full-fidelity grid of the same questions.

The naive grid is what the notebook would do: every configuration trained on the whole (larger)
training set, and the epochs question answered by separate runs with 1, 2, ..., E epochs. Ours
trains every cell once on a smaller set and reads the epochs question off the learning curves.
Both have the same cells and seeds, so the verdicts can be compared question by question.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import yaml

SCALES = {  # images of the main task per trial: ours (budgeted) and the naive grid
    "tiny": {"ours": 1000, "naive": 2000, "epochs": 2, "seeds": 2, "width": 0.125, "kernel": [3, 5],
             "batch": [100, 256], "mnist": 1000},
    "default": {"ours": 2000, "naive": 8000, "epochs": 3, "seeds": 2, "width": 0.25, "kernel": [3, 5],
                "batch": [100, 256], "mnist": 2000},
    "full": {"ours": 4000, "naive": 20000, "epochs": 4, "seeds": 3, "width": 0.25, "kernel": [2, 3, 5, 7],
             "batch": [32, 100, 256], "mnist": 8000},
}


def design_file(folder: Path, data: Path, scale: dict, naive: bool, mnist: Path) -> Path:
    """The sweep YAML of one side: the same cells; naive adds the epochs as cells of their own."""
    epochs = scale["epochs"]
    vary = {"kernel": scale["kernel"], "train.batch_size": scale["batch"]}
    if naive:
        vary["train.epochs"] = list(range(1, epochs + 1))
    doc = {
        "overrides": ["dataset=folder", f"dataset.path={data}", f"dataset.train_limit={scale['naive' if naive else 'ours']}",
                      "dataset.test_limit=1000", f"+width={scale['width']}", f"train.epochs={epochs}",
                      f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", f"tracking.artifact_root={folder / 'mlartifacts'}",
                      "tracking.log_model=false"],
        "design": {"seeds": scale["seeds"], "main": "cifar10",
                   "baseline": {"kernel": 3, "train.batch_size": 100, **({"train.epochs": epochs} if naive else {})},
                   "vary": vary,
                   "arms": {"mnist": ["dataset=mnist", "model=mnist_cnn", f"dataset.path={mnist}",
                                      f"dataset.train_limit={scale['mnist']}", "dataset.test_limit=1000"]}},
        "sweep": {"storage": f"sqlite:///{folder / 'studies.db'}", "output_dir": str(folder / "out"),
                  "study_name": "naive" if naive else "ours", "estimate": False, "system_metrics": False,
                  "log_models": "none"},
    }
    path = folder / f"{doc['sweep']['study_name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_side(path: Path) -> dict:
    from cnnexp.sweep import engine
    from cnnexp.sweep.space import load_sweep

    began = time.perf_counter()
    loaded = load_sweep(str(path))
    study = engine.optimize(loaded, show_progress=False)
    engine.finish(loaded, study)
    seconds = time.perf_counter() - began
    effects = pd.read_csv(Path(str(loaded.settings.output_dir)) / str(loaded.settings.study_name) / "effects.csv")
    images = 0
    for t in study.trials:
        if t.state.name == "COMPLETE":
            # each trial's training images (validation held out) times its epochs
            train = int(t.user_attrs.get("train_images", 0)) or _train_images(t)
            images += train * int(t.user_attrs.get("epochs_run", 0))
    return {"trials": len(study.trials), "images_trained": images, "wall_seconds": round(seconds, 1),
            "verdicts": dict(zip(effects["parameter"], effects["verdict"]))}


def _train_images(trial) -> int:
    """Training images of a trial from its overrides (the last dataset.train_limit wins, 10% is validation)."""
    limit = None
    for text in trial.user_attrs.get("overrides", []):
        if text.startswith("dataset.train_limit="):
            value = text.split("=", 1)[1]
            limit = None if value == "null" else int(value)
    return round(0.9 * (limit or 0))


def bench_time_to_answer(size: str, tmp: Path, data: Path, mnist: Path) -> dict:
    """Both studies side by side, one after the other; compute, wall time and the verdicts of each."""
    scale = SCALES[size]
    out = {"scale": {k: v for k, v in scale.items()}}
    for side in ("ours", "naive"):
        folder = tmp / side
        folder.mkdir()
        print(f"time to answer: {side} ({'the naive full-fidelity grid' if side == 'naive' else 'the designed study'}) "
              f"on {scale[side]} CIFAR-10 images ...", flush=True)
        out[side] = run_side(design_file(folder, data, scale, side == "naive", mnist))
    ours, naive = out["ours"], out["naive"]
    # The naive grid answers epochs with `train.epochs` cells; ours from the learning curves.
    compared = {p: (ours["verdicts"].get(p), naive["verdicts"].get(p)) for p in naive["verdicts"]}
    out["agreement"] = {p: {"ours": a, "naive": b, "same": a == b} for p, (a, b) in compared.items()}
    out["compute_ratio"] = round(naive["images_trained"] / max(1, ours["images_trained"]), 2)
    out["wall_ratio"] = round(naive["wall_seconds"] / max(1e-9, ours["wall_seconds"]), 2)
    return out


def to_markdown(part: dict) -> list[str]:
    s, o, n = part["scale"], part["ours"], part["naive"]
    lines = ["## Time to answer: the designed study vs a naive full-fidelity grid (target: >= 5x less compute, "
             "same verdicts)", "",
             f"Same cells and seeds ({s['seeds']} per cell: kernel {s['kernel']}, batch {s['batch']}, MNIST CNN); "
             f"ours trains {s['ours']:,} CIFAR-10 images per trial for {s['epochs']} epochs and reads epochs off the "
             f"learning curves; the naive grid trains {s['naive']:,} images per trial and runs epochs 1..{s['epochs']} "
             "as separate trials.", "",
             "| study | trials | images trained | wall time (s) |", "|---|---:|---:|---:|",
             f"| ours | {o['trials']} | {o['images_trained']:,} | {o['wall_seconds']} |",
             f"| naive grid | {n['trials']} | {n['images_trained']:,} | {n['wall_seconds']} |", "",
             f"Compute: naive / ours = **{part['compute_ratio']}x** images, **{part['wall_ratio']}x** wall time.", "",
             "| question | ours | naive | same? |", "|---|---|---|---|"]
    lines += [f"| {p} | {v['ours']} | {v['naive']} | {'yes' if v['same'] else 'no'} |"
              for p, v in part["agreement"].items()]
    return lines

"""Runs per hour of one cell: the default study's quarter-width baseline at 2,000 images x 3 epochs.

Side by side in one process, each over the same seeds (each its own training subset, as in a design):

- today's path: every run builds, compiles and traces its model (`cnnexp.run.run`), the path of commit 4257784 plus this round's
  inference batch of 1,000;
- compile once: one compiled model for the cell, re-initialised per seed (`cnnexp.train.compiled`);
- towers at k = 2, 4, 8: k seeds as one model of k towers (`cnnexp.train.towers`), compiled once;
- a bare Keras loop of the same fits (build, compile, `model.fit` on the same arrays and batches, nothing else):
  the limit for one model at a time.

Every cnnexp variant logs to a real MLflow store and scores each run on the study's 3,000 evaluation
and 2,000 test images, as a trial does. "In training" is the share of the wall spent in training
epochs (Keras' `fit` epochs, their batches and callbacks).
"""

from __future__ import annotations

import time
from pathlib import Path

SIZES = {"full": {"train": 2000, "eval": 3000, "test": 2000, "epochs": 3, "seeds": 8, "towers": [2, 4, 8]},
         "tiny": {"train": 400, "eval": 200, "test": 200, "epochs": 2, "seeds": 2, "towers": [2]}}


def _overrides(size: dict, data: Path, tmp: Path, seed: int) -> list[str]:
    return ["dataset=folder", f"dataset.path={data}", f"dataset.train_limit={size['train']}",
            f"dataset.eval_limit={size['eval']}", f"dataset.test_limit={size['test']}", "+width=0.25",
            f"train.epochs={size['epochs']}", "train.optimizer=adam", "train.verbose=0",
            f"train.seed={seed}", f"dataset.subset_seed={seed}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_root={tmp / 'mlartifacts'}",
            "tracking.log_model=false"]


def _row(runs: int, wall: float, training: float, accuracies: list[float]) -> dict:
    return {"runs": runs, "wall_s": round(wall, 2), "runs_per_hour": round(3600 * runs / wall, 1),
            "in_training": round(training / wall, 3), "mean_test_accuracy": round(sum(accuracies) / len(accuracies), 4)}


def bench_runs_per_hour(data: Path, tmp: Path, tiny: bool = False) -> dict:
    from cnnexp.config import compose_config
    from cnnexp.model.build import build_model
    from cnnexp.run import DatasetMemo, prepare, run, run_side_by_side
    from cnnexp.runtime import keras
    from cnnexp.train.callbacks import epoch_timer
    from cnnexp.train.compiled import ModelCache
    from cnnexp.train.recipe import make_optimizer

    size = SIZES["tiny" if tiny else "full"]
    seeds = list(range(size["seeds"]))
    cfgs = [compose_config(_overrides(size, data, tmp, s)) for s in seeds]
    memo = DatasetMemo()
    prepare(cfgs[0], datasets=memo)  # decoded once, before anything is timed
    run(cfgs[0], datasets=memo)  # and TensorFlow warmed up (its first model pays for loading its kernels)
    out: dict = {"cell": "quarter width, kernel 3, batch 100, Adam", "train_images": size["train"],
                 "epochs": size["epochs"], "seeds": len(seeds)}

    def singly(models):
        began, training, accuracies = time.perf_counter(), 0.0, []
        for cfg in cfgs:
            result = run(cfg, datasets=memo, models=models, curve=False)
            training += sum(result.history["epoch_seconds"])
            accuracies.append(result.metrics["test_accuracy"])
        return _row(len(cfgs), time.perf_counter() - began, training, accuracies)

    out["today"] = singly(None)
    out["compile_once"] = singly(ModelCache())
    for k in size["towers"]:
        models, began, training, accuracies = ModelCache(), time.perf_counter(), 0.0, []
        for start in range(0, len(cfgs), k):
            group = cfgs[start:start + k]
            results = run_side_by_side(group, [[]] * len(group), [None] * len(group),
                                       [f"tower-{s}" for s in seeds[start:start + k]], datasets=memo, models=models)
            training += sum(results[0].history["epoch_seconds"]) * len(group)  # each holds its 1/k share
            accuracies += [r.metrics["test_accuracy"] for r in results]
        out[f"towers_{k}"] = _row(len(cfgs), time.perf_counter() - began, training, accuracies)

    began, training, accuracies = time.perf_counter(), 0.0, []
    for cfg in cfgs:  # the bare loop: the same arrays, the same batches, nothing but Keras
        layers, dataset = prepare(cfg, validated=True, datasets=memo)
        keras().backend.clear_session()
        keras().utils.set_random_seed(int(cfg.train.seed))
        model = build_model(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding)
        model.compile(optimizer=make_optimizer(cfg.train, 1000), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        timer = epoch_timer()
        model.fit(dataset.x_train, dataset.y_train, batch_size=int(cfg.train.batch_size),
                  epochs=int(cfg.train.epochs), callbacks=[timer], verbose=0)
        training += sum(timer.seconds)
        accuracies.append(float(model.evaluate(dataset.x_test, dataset.y_test, batch_size=1000, verbose=0)[1]))
    out["bare_fit"] = _row(len(cfgs), time.perf_counter() - began, training, accuracies)
    today = out["today"]["runs_per_hour"]
    for name in [n for n in out if isinstance(out[n], dict)]:
        out[name]["vs_today"] = round(out[name]["runs_per_hour"] / today, 2)
        out[name]["vs_bare"] = round(out[name]["runs_per_hour"] / out["bare_fit"]["runs_per_hour"], 2)
    return out


LABELS = {"today": "today's path (build, compile, trace per run)", "compile_once": "compile once per cell",
          "bare_fit": "bare Keras fit loop (no evaluation, no tracking)"}


def to_markdown(part: dict) -> list[str]:
    lines = [f"## Runs per hour: {part['cell']}, {part['train_images']:,} images x {part['epochs']} epochs, "
             f"{part['seeds']} seeds (target: towers >= 2x today; one run within 1.2x of the bare loop)", "",
             "| path | runs/hour | vs today | vs bare loop | wall in training | mean test accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in part.items():
        if isinstance(row, dict):
            label = LABELS.get(name, f"compile once + {name.split('_')[1]} towers")
            lines.append(f"| {label} | {row['runs_per_hour']:,} | {row['vs_today']}x | {row['vs_bare']}x | "
                         f"{100 * row['in_training']:.0f}% | {row['mean_test_accuracy']:.3f} |")
    return lines

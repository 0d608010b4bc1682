"""Helpers shared by the test modules: tiny real sweeps with every store under a temporary folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from mlflow import MlflowClient

from cnnexp.study import optuna_study as study
from tests.conftest import CIFAR_JPEG, tracking_overrides

# Adam learns 1,000 CIFAR-10 images to ~20% test accuracy in 2 epochs at quarter width: clearly above chance.
TINY = ["dataset=folder", f"dataset.path={CIFAR_JPEG}", "dataset.train_limit=1000", "dataset.test_limit=300",
        "+width=0.25", "train.epochs=2", "train.optimizer=adam"]


def empty_mlflow_store(folder: Path) -> Path:
    """folder/mlflow.db as a new, empty MLflow store: a copy of one made once per test process, since MLflow's schema
    migrations take about 2 s per new SQLite store (a fifth of a one-trial sweep test). Tests of making a store
    (tests/test_run.py) let MLflow make their own."""
    template = Path(os.environ["CNNEXP_CACHE_DIR"]).parent / "mlflow-template.db"
    if not template.exists():
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it
    target = folder / "mlflow.db"
    if not target.exists():
        shutil.copyfile(template, target)
    return target


def write_sweep(tmp_path, params, settings=None, overrides=(), name="tiny", mlflow_store=True):
    """A sweep YAML on a tiny real subset, with every store and output under tmp_path (the MLflow store made empty
    beforehand unless mlflow_store=False)."""
    if mlflow_store:
        empty_mlflow_store(tmp_path)
    doc = {
        "overrides": [*TINY, *tracking_overrides(tmp_path), *overrides],
        "sweep": {"n_trials": 3, "storage": f"sqlite:///{tmp_path / 'studies.db'}",
                  "output_dir": str(tmp_path / "out"), "estimate": False, "system_metrics": False,
                  "sampler": {"name": "tpe", "seed": 0}, **(settings or {})},
        "params": params,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def mlflow_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnexp")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    parents = [r for r in runs if r.data.tags.get("cnnexp.role") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def states(s):
    return [t.state.name for t in sorted(s.trials, key=lambda t: t.number)]


def config_seeds(s):
    """(configuration, seed) of every trial that finished training: no pair may appear twice.

    An attempt that was interrupted and retried is the same training continued, with its seed.
    """
    return [(study.config_key(t.params), t.user_attrs["seed"]) for t in s.trials
            if "seed" in t.user_attrs and t.state.name == "COMPLETE"]


def finish(s, result) -> int:
    """What the sweep CLI does after the last trial: the report, then the parent run ended."""
    from cnnexp.sweep import report

    return report(s, result)

"""One experiment: `python -m cnnexp.run [overrides]`, e.g. `python -m cnnexp.run +kernel=7`.

`run(cfg)` is the function that tests, sweeps and benchmarks call; `main` is a thin Hydra
wrapper that prints the score like the notebook did.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cnnexp import CONF_DIR, model, runtime
from cnnexp.config import optimizer_settings, overrides_to_command, validate_config
from cnnexp.data.load import Dataset, describe, keras_cache_dir, load_dataset
from cnnexp.errors import CnnexpError
from cnnexp.tracking import runs
from cnnexp.train import TrainResult, resolve_precision, train_model

log = logging.getLogger("cnnexp")

# Errors that are the user's to fix: reported in one line, without a traceback.
USER_ERRORS = (CnnexpError,)


@dataclass
class RunResult:
    """The outcome of one experiment: scores, cost, and what it was (for the sweep and the report)."""

    metrics: dict[str, float]           # test_loss, test_accuracy, val_accuracy, val_loss, ... (plain floats)
    history: dict[str, list[float]]     # per epoch, from epoch 1
    cost: model.Cost                    # parameters and FLOPs per image
    run_id: str | None                  # the MLflow run (None when tracking is off or broken)
    resumed_from_epoch: int = 0
    warnings: list[str] = field(default_factory=list)
    dataset_note: str = ""
    model: object = field(default=None, repr=False)      # the trained Keras model
    example: object = field(default=None, repr=False)    # a few test inputs, for a model signature

    def __getitem__(self, key: str) -> float:  # result["test_accuracy"], as before
        return self.metrics[key]


@lru_cache(maxsize=1)
def _dataset(dataset_yaml: str, val_fraction: float, seed: int) -> Dataset:
    # Kept in memory between runs of one process, so that trials of a sweep share one decode.
    return load_dataset(OmegaConf.create(dataset_yaml), val_fraction, seed)


def prepare(cfg: DictConfig, validated: bool = False) -> tuple[list[model.LayerSpec], Dataset]:
    """Validate everything that can be validated, then load the data: nothing trains yet."""
    if not validated:
        validate_config(cfg)
    layers = model.layers_from_config(cfg)
    # Shapes are known from the config for every dataset, so a bad architecture fails
    # here, before any data is decoded; the class count is re-checked once it is known.
    model.validate_architecture(layers, cfg.dataset.input_shape, cfg.dataset.num_classes, cfg.model.padding)
    dataset = _dataset(OmegaConf.to_yaml(cfg.dataset, resolve=True),
                       float(cfg.train.val_fraction), int(cfg.train.seed))
    model.validate_architecture(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding)
    return layers, dataset


def resolved_config(cfg: DictConfig, layers: list[model.LayerSpec]) -> DictConfig:
    """The config as trained: shortcuts applied to the layers, the optimizer's defaults filled in."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.model.layers = model.layers_config(layers)
    _, lr, momentum = optimizer_settings(cfg.train)
    out.train.lr, out.train.momentum = lr, momentum
    for shortcut in ("kernel", "filters", "width"):
        out.pop(shortcut, None)
    return out


def run(
    cfg: DictConfig,
    overrides: Sequence[str] = (),
    callbacks: Iterable = (),
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict | None = None,
    run_id: str | None = None,
    checkpoint_dir=None,
    validated: bool = False,
) -> RunResult:
    """Train and evaluate one model, logging it to MLflow.

    Args:
        cfg: a composed experiment config (see `cnnexp.config.compose_config`).
        overrides: the Hydra overrides that produced `cfg`; they form the reproduce command.
        callbacks: extra Keras callbacks (a sweep's pruning callback).
        parent_run_id: makes the MLflow run a child of this run (a sweep's study run).
        run_name, tags: for the MLflow run.
        run_id: log into this existing MLflow run (created, and ended, by a sweep's objective).
        checkpoint_dir: checkpoint every epoch here and resume from it (see `train.train_model`).
        validated: the caller validated `cfg` already (a sweep validates each trial once).
    """
    layers, dataset = prepare(cfg, validated=validated)
    k = runtime.keras()
    cost = model.cost(layers, dataset.input_shape, cfg.model.padding)
    trained = resolved_config(cfg, layers)
    run_tags = {
        f"{runs.TAG_PREFIX}command": overrides_to_command(overrides),
        "mlflow.source.git.commit": runtime.git_commit(),
        f"{runs.TAG_PREFIX}device": runtime.device_description(),
        f"{runs.TAG_PREFIX}dataset_fingerprint": dataset.fingerprint,
        f"{runs.TAG_PREFIX}keras_backend": k.backend.backend(),
        f"{runs.TAG_PREFIX}dataset_note": dataset.note or None,
        **(tags or {}),
    }
    name = run_name or f"{cfg.model.name}-{cfg.dataset.name}"
    with runs.start_run(cfg.tracking, name, run_tags, parent_run_id, run_id) as mlrun:
        # Epochs already in the run: a trial resumed from its checkpoint has them (and its params).
        logged = mlrun.metric_steps("val_accuracy") if run_id is not None else set()
        resumed = bool(logged)
        if not resumed:  # a resumed trial's run has all of this already
            params = runs.flatten(trained)
            params["model.layers_resolved"] = model.layers_text(layers)
            params["model.flops_per_image"] = cost.flops
            params["model.num_params"] = cost.params
            params["overrides"] = " ".join(overrides) or "(defaults)"
            mlrun.log_params(params)
            mlrun.log_text(OmegaConf.to_yaml(trained), "config.yaml")
            source = Path(os.path.expanduser(str(cfg.dataset.get("path") or keras_cache_dir()))).resolve()
            mlrun.log_dataset(str(cfg.dataset.name), source.as_uri(), dataset.fingerprint)

        # Every run starts from a clean, seeded state: nothing leaks from a previous trial.
        k.backend.clear_session()
        k.utils.set_random_seed(int(cfg.train.seed))
        # Set on every run, so that no trial inherits another's policy.
        k.mixed_precision.set_global_policy(resolve_precision(cfg.train))
        net = model.build_model(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding,
                                name=str(cfg.model.name))
        if not resumed:
            summary: list[str] = []
            net.summary(print_fn=lambda line, *args, **kwargs: summary.append(line))
            mlrun.log_text("\n".join(summary), "model_summary.txt")
        log.info("%s | %d parameters, %.1f MFLOPs per image | %s", describe(dataset), cost.params,
                 cost.flops / 1e6, runtime.device_description())

        result: TrainResult = train_model(net, dataset, cfg.train, checkpoint_dir=checkpoint_dir,
                                          callbacks=[runs.epoch_logger(mlrun, logged), *callbacks])
        if result.resumed_from_epoch and mlrun.active:
            # Epochs checkpointed before the worker died but not yet in MLflow: log them once.
            names = {"loss": "train_loss", "accuracy": "train_accuracy", "val_loss": "val_loss",
                     "val_accuracy": "val_accuracy"}
            for epoch in range(1, result.resumed_from_epoch + 1):
                if epoch not in logged:
                    mlrun.log_metrics({names[k]: v[epoch - 1] for k, v in result.history.items() if k in names},
                                      step=epoch)
        metrics = {
            "test_loss": result.test_loss,
            "test_accuracy": result.test_accuracy,
            "val_accuracy": result.history.get("val_accuracy", [float("nan")])[-1],
            "val_loss": result.history.get("val_loss", [float("nan")])[-1],
            "epochs_run": result.epochs_run,
            "train_seconds": result.train_seconds,
            "images_per_second": result.images_per_second,
        }
        metrics = {key: runs.clean(value) for key, value in metrics.items()}
        # val_* were logged per epoch already; the rest are the run's final figures.
        mlrun.log_metrics({f"final/{k}": v for k, v in metrics.items() if not k.startswith("val_")},
                          step=result.epochs_run)
        for message in result.warnings:
            warnings.warn(f"{name}: {message}; the run is flagged (tag cnnexp.flag).", stacklevel=2)
        if result.warnings:
            mlrun.set_tags({f"{runs.TAG_PREFIX}flag": "; ".join(result.warnings)})
        if cfg.tracking.log_model:
            mlrun.log_model(net, dataset.x_test[:4])
    return RunResult(metrics=metrics, history=result.history, cost=cost, run_id=mlrun.run_id,
                     resumed_from_epoch=result.resumed_from_epoch, warnings=result.warnings, dataset_note=dataset.note,
                     model=net, example=dataset.x_test[:4])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from cnnexp.console import setup_logging

    setup_logging(verbose=bool(cfg.get("verbose", False)))
    overrides = list(HydraConfig.get().overrides.task)
    try:
        result = run(cfg, overrides=overrides)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"test loss: {result['test_loss']:.4f}")
    print(f"test accuracy: {result['test_accuracy']:.4f}")
    print(f"({result['images_per_second']:.0f} images/s in training; {result.cost.params:,} parameters, "
          f"{result.cost.flops / 1e6:.1f} MFLOPs per image; MLflow run {result.run_id or 'not logged'})")
    return result["test_accuracy"]


if __name__ == "__main__":
    main()

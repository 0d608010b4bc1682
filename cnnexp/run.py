"""One experiment: `python -m cnnexp.run [overrides]`, e.g. `python -m cnnexp.run +kernel=7`.

`run(cfg)` is the function that tests, sweeps and benchmarks call; `main` is a thin Hydra
wrapper that prints the score like the notebook did.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache

import hydra
from omegaconf import DictConfig, OmegaConf

from cnnexp import CONF_DIR, data, model, runtime, tracking
from cnnexp.config import ConfigError, overrides_to_command, validate_config
from cnnexp.train import NonFiniteLossError, resolve_precision, train_model

log = logging.getLogger("cnnexp")

# Errors that are the user's to fix: reported in one line, without a traceback.
USER_ERRORS = (ConfigError, model.ModelConfigError, data.DataError, NonFiniteLossError)


@lru_cache(maxsize=1)
def _dataset(dataset_yaml: str, val_fraction: float, seed: int) -> data.Dataset:
    # Kept in memory between runs of one process, so that trials of a sweep share one decode.
    return data.load_dataset(OmegaConf.create(dataset_yaml), val_fraction, seed)


def prepare(cfg: DictConfig) -> tuple[list[model.LayerSpec], data.Dataset]:
    """Validate everything that can be validated, then load the data: nothing trains yet."""
    validate_config(cfg)
    layers = model.layers_from_config(cfg)
    # Shapes are known from the config for every dataset, so a bad architecture fails
    # here, before any data is decoded; the class count is re-checked once it is known.
    model.validate_architecture(layers, cfg.dataset.input_shape, cfg.dataset.num_classes, cfg.model.padding)
    dataset = _dataset(OmegaConf.to_yaml(cfg.dataset, resolve=True),
                       float(cfg.train.val_fraction), int(cfg.train.seed))
    model.validate_architecture(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding)
    return layers, dataset


def run(
    cfg: DictConfig,
    overrides: Sequence[str] = (),
    callbacks: Iterable = (),
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict | None = None,
    run_id: str | None = None,
) -> dict:
    """Train and evaluate one model, logging it to MLflow.

    Args:
        cfg: a composed experiment config (see `cnnexp.config.compose_config`).
        overrides: the Hydra overrides that produced `cfg`; they form the reproduce command.
        callbacks: extra Keras callbacks (a sweep's pruning callback).
        parent_run_id: makes the MLflow run a child of this run (a sweep's study run).
        run_name, tags: for the MLflow run.
        run_id: log into this existing MLflow run (created by a sweep for its trial).

    Returns:
        Metrics: test_loss, test_accuracy, val_accuracy, params, epochs_run, images_per_second, ...
    """
    layers, dataset = prepare(cfg)
    k = runtime.keras()
    command = overrides_to_command(overrides)
    run_tags = {
        f"{tracking.TAG_PREFIX}command": command,
        "mlflow.source.git.commit": runtime.git_commit(),
        f"{tracking.TAG_PREFIX}device": runtime.device_description(),
        f"{tracking.TAG_PREFIX}dataset_fingerprint": dataset.fingerprint,
        f"{tracking.TAG_PREFIX}keras_backend": k.backend.backend(),
        **(tags or {}),
    }
    name = run_name or f"{cfg.model.name}-{cfg.dataset.name}"
    with tracking.start_run(cfg.tracking, name, run_tags, parent_run_id, run_id) as mlrun:
        params = tracking.flatten(cfg)
        params["model.layers_resolved"] = _layers_text(layers)
        params["overrides"] = " ".join(overrides) or "(defaults)"
        mlrun.log_params(params)
        mlrun.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

        # Every run starts from a clean, seeded state: nothing leaks from a previous trial.
        k.backend.clear_session()
        k.utils.set_random_seed(int(cfg.train.seed))
        # Set on every run, so that no trial inherits another's policy.
        k.mixed_precision.set_global_policy(resolve_precision(cfg.train))
        net = model.build_model(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding,
                                name=str(cfg.model.name))
        summary: list[str] = []
        net.summary(print_fn=lambda line, *args, **kwargs: summary.append(line))
        mlrun.log_text("\n".join(summary), "model_summary.txt")
        log.info("%s | %d parameters | %s", data.describe(dataset), net.count_params(),
                 runtime.device_description())

        result = train_model(net, dataset, cfg.train, callbacks=[mlrun.epoch_callback(), *callbacks])
        metrics = {
            "test_loss": result.test_loss,
            "test_accuracy": result.test_accuracy,
            "val_accuracy": result.history.get("val_accuracy", [float("nan")])[-1],
            "val_loss": result.history.get("val_loss", [float("nan")])[-1],
            "params": result.params,
            "epochs_run": result.epochs_run,
            "train_seconds": result.train_seconds,
            "images_per_second": result.images_per_second,
        }
        # val_* were logged per epoch already; the rest are the run's final figures.
        mlrun.log_metrics({k: v for k, v in metrics.items() if not k.startswith("val_")},
                          step=result.epochs_run)
        if cfg.tracking.log_model:
            mlrun.log_model(net, dataset.x_test[:4])
        metrics["run_id"] = mlrun.run_id
        metrics["history"] = result.history
        metrics["model"] = net  # for callers that log it later (a sweep's best trial)
        metrics["example"] = dataset.x_test[:4]
    return metrics


def _layers_text(layers: list[model.LayerSpec]) -> str:
    short = {"conv": lambda s: f"c{s.filters}k{s.kernel}", "pool": lambda s: f"m{s.size}",
             "flatten": lambda s: "f", "dense": lambda s: f"d{s.units}", "dropout": lambda s: f"r{s.rate}"}
    return " ".join(short[s.type](s) for s in layers)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    try:
        metrics = run(cfg, overrides=overrides)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"test loss: {metrics['test_loss']:.4f}")
    print(f"test accuracy: {metrics['test_accuracy']:.4f}")
    print(f"({metrics['images_per_second']:.0f} images/s in training; MLflow run {metrics['run_id']})")
    return metrics["test_accuracy"]


if __name__ == "__main__":
    main()

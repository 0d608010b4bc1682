"""Tracking stage: one MLflow run per experiment, with everything needed to compare and reproduce.

Logging never decides the fate of training: when the tracking server fails mid-run, a
warning says what was not logged and training (and the Optuna record) go on.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

TAG_PREFIX = "cnnexp."


def configure(tracking_cfg) -> str | None:
    """Point MLflow at the configured store; returns the experiment id (None when disabled)."""
    if not tracking_cfg.enabled:
        return None
    import mlflow

    uri = absolute_uri(str(tracking_cfg.uri))
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(tracking_cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_cfg.artifact_root and not uri.startswith(("http://", "https://", "databricks")):
        # A local store keeps artifacts beside it, at an absolute location, so that
        # `make ui` finds them whatever folder a run was started from.
        location = Path(os.path.expanduser(str(tracking_cfg.artifact_root))).resolve().as_uri()
    try:
        return mlflow.create_experiment(tracking_cfg.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another worker created it between our lookup and our create.
        return mlflow.get_experiment_by_name(tracking_cfg.experiment).experiment_id


def absolute_uri(uri: str) -> str:
    """sqlite:///mlflow.db -> sqlite:////abs/path/mlflow.db, so that other processes find the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """Flatten a config into MLflow params: {'train.lr': '0.01', 'model.layers': '[...]'}."""
    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]  # MLflow's limit on a param value
    return out


class Run:
    """A started MLflow run, or a stand-in that drops everything when tracking is off."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self._broken = False  # after one failure, stop paying retries for every later call

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _safely(self, what: str, fn, *args, **kwargs):
        if not self.active or self._broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a logging failure must not stop training
            self._broken = True
            warnings.warn(f"MLflow: {what} and everything after it were not logged for run {self.run_id} "
                          f"(training and the Optuna record go on): {err}", stacklevel=2)
            return None

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient()

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._safely("params", self.client().log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        self._safely("tags", self.client().log_batch, self.run_id, tags=items)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._safely("metrics", self.client().log_batch, self.run_id, metrics=items)

    def log_text(self, text: str, path: str) -> None:
        self._safely(path, self.client().log_text, self.run_id, text, path)

    def log_artifact(self, local_path: str | Path, folder: str | None = None) -> None:
        self._safely("artifacts", self.client().log_artifact, self.run_id, str(local_path), folder)

    def log_model(self, model, example) -> None:
        """The Keras model with its input/output signature, through MLflow's Keras flavour."""
        if not self.active:
            return
        import keras
        import mlflow
        from mlflow.models import infer_signature

        def log():
            signature = infer_signature(example, model.predict(example, verbose=0))
            # Pinning the requirements skips MLflow's slow inference of them (it reloads the model).
            requirements = [f"keras=={keras.__version__}"]
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                requirements.append(f"tensorflow=={tf.__version__}")
            with mlflow.start_run(run_id=self.run_id):
                mlflow.keras.log_model(model, name="model", signature=signature,
                                       pip_requirements=requirements)

        self._safely("the model", log)

    def epoch_callback(self):
        """A Keras callback that logs train/val loss and accuracy at every epoch."""
        from cnnexp.runtime import keras

        run = self

        class LogEpoch(keras().callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                names = {"loss": "train_loss", "accuracy": "train_accuracy",
                         "val_loss": "val_loss", "val_accuracy": "val_accuracy"}
                run.log_metrics({names[k]: v for k, v in (logs or {}).items() if k in names}, step=epoch)

        return LogEpoch()

    def end(self, status: str = "FINISHED") -> None:
        self._safely("the run status", self.client().set_terminated, self.run_id, status)


@contextmanager
def start_run(tracking_cfg, run_name: str, tags: dict | None = None, parent_run_id: str | None = None,
              run_id: str | None = None):
    """Start an MLflow run (or continue `run_id`) and always end it: FINISHED, FAILED or KILLED.

    A run is never left RUNNING: exceptions, Ctrl-C and SIGTERM (raised as KeyboardInterrupt
    or SystemExit by our handlers) all end it with a status and the reason as a tag.
    """
    run = Run(None)
    experiment_id = None
    if run_id is not None:  # created by the caller (a sweep's trial): log into it
        run = Run(run_id)
        run.set_tags(tags or {})
    try:
        experiment_id = configure(tracking_cfg)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"MLflow at {tracking_cfg.uri} is unreachable, this run is not logged: {err}",
                      stacklevel=2)
    if experiment_id is not None and not run.active:
        from mlflow import MlflowClient

        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        try:
            created = MlflowClient().create_run(experiment_id, run_name=run_name, tags=all_tags)
            run = Run(created.info.run_id)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"MLflow could not start a run, this run is not logged: {err}", stacklevel=2)
    try:
        yield run
    except (KeyboardInterrupt, SystemExit) as err:
        run.set_tags({"error": f"interrupted ({type(err).__name__})"})
        run.end("KILLED")
        raise
    except BaseException as err:
        run.set_tags({"error": f"{type(err).__name__}: {err}"})
        run.end("FAILED")
        raise
    else:
        run.end("FINISHED")

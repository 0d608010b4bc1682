"""Tracking stage: MLflow runs, with one owner per run and one error policy.

Tracking never decides the fate of training. The store is contacted once per process, with a
bounded wait (`tracking.timeout` seconds) and, for a local SQLite file, under a lock so that
processes starting together never race through MLflow's table migrations. If the store can't be
used, one warning names it and says what is not logged; training, the terminal and the Optuna
study go on. After the first failure on a run, later calls on it are skipped (no retry storms).

Whoever creates a run ends it, exactly once: `start_run` for a single `cnnexp.run`, the sweep's
objective for a trial's child run, the sweep for its parent run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cnnexp.runtime import git_commit, keras
from cnnexp.tracking.store import TrackingUnavailable, configure

log = logging.getLogger(__name__)

TAG_PREFIX = "cnnexp."
# How long ending a run keeps asking a store that does not answer (locked by another program, a server restarting).
END_RETRY_SECONDS = 180

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


def clean(value):
    """A plain Python float for MLflow (no float32 noise such as 0.11999999731779099)."""
    try:
        return float(f"{float(value):.6g}")
    except (TypeError, ValueError):
        return value


class Run:
    """A started MLflow run, or a stand-in that drops everything when tracking is off or broken."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self._broken: str | None = None  # what failed first: later calls are skipped (no retry storms)
        self._ended = False

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._broken

    def _safely(self, what: str, fn, *args, **kwargs):
        """Call `fn` (or the client method of that name), turning any failure into one warning."""
        if not self.active:
            return None
        try:
            if isinstance(fn, str):
                fn = getattr(self.client(), fn)
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a logging failure must not stop training
            self._broken = f"{what}: {str(err).splitlines()[0][:300] if str(err) else type(err).__name__}"
            warnings.warn(f"MLflow: {what} and everything after it were not logged for run {self.run_id} "
                          f"(training and the Optuna record go on): {self._broken}", stacklevel=3)
            return None

    @staticmethod
    def client():
        from mlflow import MlflowClient

        return MlflowClient()

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._safely("params", "log_batch", self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        self._safely("tags", "log_batch", self.run_id, tags=items)

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, clean(v), now, step) for k, v in metrics.items() if v is not None]
        self._safely("metrics", "log_batch", self.run_id, metrics=items)

    def metric_steps(self, key: str) -> set[int]:
        """Steps already logged for a metric (a resumed trial logs only the epochs that are missing)."""
        history = self._safely("metric history", "get_metric_history", self.run_id, key)
        return {m.step for m in history or []}

    def log_text(self, text: str, path: str) -> None:
        self._safely(path, "log_text", self.run_id, text, path)

    def log_artifact(self, local_path: str | Path, folder: str | None = None) -> None:
        self._safely("artifacts", "log_artifact", self.run_id, str(local_path), folder)

    def rename(self, name: str) -> None:
        self._safely("the run name", "update_run", self.run_id, name=name)

    def log_dataset(self, name: str, source: str, digest: str, context: str = "training") -> None:
        """Record the dataset the run trained on (name, source, fingerprint) in MLflow's Datasets column."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        def log():
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local file
                warnings.simplefilter("ignore")
                resolved = resolve_dataset_source(source)
            dataset = MetaDataset(source=resolved, name=name, digest=digest)
            entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
            self.client().log_inputs(self.run_id, datasets=[entity])

        self._safely("the dataset", log)

    def log_model(self, model, example) -> str | None:
        """The Keras model with its signature (MLflow's Keras flavour); returns its model URI."""
        if not self.active:
            return None
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
            # Model.log with run_id and a logged model made in the run's experiment, not the fluent
            # start_run: a failure inside that context would end the run FAILED although its training
            # completed, and without it the model would land in the default experiment.
            client = self.client()
            logged = client.create_logged_model(experiment_id=client.get_run(self.run_id).info.experiment_id,
                                                name="model", source_run_id=self.run_id)
            info = mlflow.models.Model.log(None, flavor=mlflow.keras, name="model", model=model, signature=signature,
                                           pip_requirements=requirements, run_id=self.run_id, model_id=logged.model_id)
            return info.model_uri

        return self._safely("the model", log)

    def logged_model_uri(self) -> str | None:
        """The URI of the model this run logged (None when it logged none)."""

        def find():
            import mlflow

            experiment = self.client().get_run(self.run_id).info.experiment_id
            models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list",
                                                 filter_string=f"source_run_id = '{self.run_id}'")
            return f"models:/{models[0].model_id}" if models else None

        return self._safely("the logged model lookup", find)

    def register(self, model_uri: str, name: str, alias: str = "champion") -> str | None:
        """Register the model as a new version of `name` and point `alias` at it; returns the version."""

        def register():
            import mlflow

            quiet = open(os.devnull, "w")  # MLflow prints "Registered model ..." lines
            with quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                version = mlflow.register_model(model_uri, name, tags={"cnnexp.run_id": self.run_id})
            self.client().set_registered_model_alias(name, alias, version.version)
            return str(version.version)

        return self._safely("the model registration", register)

    @contextlib.contextmanager
    def system_metrics(self, enabled: bool = True, interval: float = 5.0):
        """CPU, memory (and GPU where pynvml finds one) sampled while the block runs, under `system/`."""
        monitor = None
        if enabled and self.active:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval)
                monitor.start()
            except Exception as err:  # noqa: BLE001 - e.g. psutil missing
                log.debug("system metrics off: %s", err)
                monitor = None
        try:
            yield
        finally:
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.finish()

    def reopen(self) -> None:
        """Mark a run RUNNING again (a trial that resumes from its checkpoint logs into its old run)."""
        self._ended = False
        self._safely("the run status", "update_run", self.run_id, status="RUNNING")

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run once, with the status of its training, even after a tracking error.

        The end is tried even when an earlier call failed (a full artifact store does not keep
        the run RUNNING); what could not be logged is recorded in the tag `cnnexp.tracking_error`.
        """
        if self._ended or self.run_id is None:
            return
        from mlflow.entities import RunTag

        self._ended = True
        # Whether this process had TensorFlow loaded when the run ended: 'false' on the JAX path without it
        # (KERAS_BACKEND=jax, train.pipeline=numpy). Where TensorFlow is installed, Keras loads it on any backend.
        tags = {"error": error[:5000] if error else None, f"{TAG_PREFIX}tracking_error": self._broken,
                f"{TAG_PREFIX}tensorflow_loaded": str("tensorflow" in sys.modules).lower()}
        items = [RunTag(k, str(v)) for k, v in tags.items() if v]
        try:
            if items:
                self.client().log_batch(self.run_id, tags=items)
        except Exception:  # noqa: BLE001 - the status below matters more than these tags
            pass
        # A store locked by another program (or a server that restarts) answers later: keep asking, within a limit.
        deadline, wait = time.monotonic() + END_RETRY_SECONDS, 1.0
        while True:
            try:
                self.client().set_terminated(self.run_id, status)
                return
            except Exception as err:  # noqa: BLE001
                if not _transient(err) or time.monotonic() + wait > deadline:
                    warnings.warn(f"MLflow: run {self.run_id} could not be ended {status} within {END_RETRY_SECONDS}s "
                                  f"({str(err).splitlines()[0][:300]}); it shows RUNNING until "
                                  "`python -m cnnexp.report` or a rerun ends it.", stacklevel=2)
                    return
                time.sleep(wait)
                wait = min(wait * 2, 15.0)


def _transient(err: Exception) -> bool:
    """An error a store gets over by itself (a lock held by another program, a server restarting), not a broken one."""
    text = f"{type(err).__name__}: {err}".lower()
    return any(word in text for word in ("locked", "timed out", "timeout", "connection", " 502", " 503", "temporar"))


def _experiment(tracking_cfg, what: str) -> str | None:
    """The experiment id, or None (tracking off, or the store unusable: then one warning says so)."""
    try:
        return configure(tracking_cfg)
    except TrackingUnavailable as err:
        warn_once(f"{err}. Not logged to MLflow: {what}; training goes on, the result is printed "
                  "and kept in the Optuna study.")
        return None


def open_run(tracking_cfg, name: str, tags: dict | None = None, parent_run_id: str | None = None) -> Run:
    """Create a run; a stand-in (logging nothing) with one warning when the store can't be used."""
    experiment_id = _experiment(tracking_cfg, "this run's params, metrics and model")
    if experiment_id is None:
        return Run(None)
    all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        created = Run.client().create_run(experiment_id, run_name=name, tags=all_tags)
    except Exception as err:  # noqa: BLE001
        warn_once(f"MLflow could not start a run, this run is not logged (training goes on): {err}")
        return Run(None)
    return Run(created.info.run_id)


class _Warned:
    """The tracking warnings this process gave already: each is said once, not per trial (an explicit cache)."""

    def __init__(self):
        self.messages: set[str] = set()

    def clear(self) -> None:
        self.messages.clear()


WARNED = _Warned()


def warn_once(message: str) -> None:
    if message not in WARNED.messages:
        WARNED.messages.add(message)
        warnings.warn(message, stacklevel=3)


def status_of(err: BaseException | None) -> str:
    """The MLflow status for how a run ended: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED."""
    if err is None:
        return "FINISHED"
    return "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"


@contextlib.contextmanager
def start_run(tracking_cfg, run_name: str, tags: dict | None = None, parent_run_id: str | None = None,
              run_id: str | None = None):
    """Yield a run and end it exactly once, with a status and the reason; never left RUNNING.

    With `run_id` (a run created by a sweep's objective) the run is only logged into: its owner ends it.
    """
    if run_id is not None:
        run = Run(run_id)
        run.set_tags(tags or {})
        yield run
        return
    run = open_run(tracking_cfg, run_name, tags, parent_run_id)
    try:
        yield run
    except BaseException as err:
        run.end(status_of(err), error=f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
        raise
    run.end("FINISHED")


def epoch_logger(run: Run, already_logged: set[int], names: dict[str, str]):
    """A Keras callback logging the epoch logs named in `names` ({Keras name: MLflow name}) at step = epoch (from 1).

    Epochs in `already_logged` (a trial resumed from its checkpoint) are not logged twice.
    """
    class LogEpoch(keras().callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 not in already_logged:
                run.log_metrics({names[k]: v for k, v in (logs or {}).items() if k in names}, step=epoch + 1)

    return LogEpoch()


def study_run(tracking_cfg, study_name: str, params: dict, known_id: str | None = None,
              study_uuid: str = "", reopen: bool = True) -> Run:
    """The study's MLflow parent run: found again on resume (by id, else by the study's uuid), never duplicated.

    A new study of the same name (its storage was deleted) gets a parent of its own: runs are
    matched by the study's uuid, not its name. The caller holds the study lock, so that workers
    starting together find one parent.
    """
    experiment_id = _experiment(tracking_cfg, "this study's runs")
    if experiment_id is None:
        return Run(None)

    def find() -> str | None:
        from mlflow.exceptions import MlflowException

        client = Run.client()
        if known_id:
            try:
                return client.get_run(known_id).info.run_id
            except MlflowException:
                pass  # deleted, or another store: look it up by the study's uuid
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`cnnexp.study_uuid` = '{study_uuid}' and tags.`cnnexp.role` = 'study'",
            order_by=["attributes.start_time ASC"], max_results=1)
        return found[0].info.run_id if found else None

    try:
        found = find()
    except Exception as err:  # noqa: BLE001 - the store answered configure() but not this: don't log the study
        warn_once(f"MLflow: the study's run could not be looked up, this study is not logged (training goes on): "
                  f"{str(err).splitlines()[0][:300]}")
        return Run(None)
    if found:
        run = Run(found)
        if reopen:  # a worker that joins a finished study has nothing to run: its parent stays ended
            run.reopen()
        return run
    run = open_run(tracking_cfg, f"study {study_name}", {"cnnexp.study": study_name, "cnnexp.role": "study",
                                                          "cnnexp.study_uuid": study_uuid,
                                                          "mlflow.source.git.commit": git_commit() or ""})
    run.log_params(params)
    return run

"""The MLflow store: opened once per process, with a bounded wait, under a lock for a new SQLite file.

Processes that start together on a store that does not exist yet would race through MLflow's
table migrations and leave it half-migrated; a read-only folder would make MLflow retry for
minutes. Here the first contact runs under a lock beside the SQLite file, in a thread that is
given `tracking.timeout` seconds, after a cheap check that the file can be written at all. A
store that fails is remembered, so the rest of the process doesn't wait for it again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cnnexp import runtime, stores
from cnnexp.errors import CnnexpError, TrackingUnavailable

# MLflow 3's UI opens GenAI experiments on traces; this tag marks ours as model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def absolute_uri(uri: str) -> str:
    """sqlite:///mlflow.db -> sqlite:////abs/path/mlflow.db, so that other processes find the same store."""
    return stores.parse(uri, "tracking.uri", stores.MLFLOW).absolute()


class _Contacts:
    """What this process learnt of its MLflow stores: experiment ids, and stores that failed (not waited for again)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.experiments: dict[tuple[str, str], str] = {}
        self.broken: dict[str, str] = {}


CONTACTS = _Contacts()


def use(uri: str) -> str:
    """Point MLflow's fluent API (model logging, registration) at `uri`: the one place that sets it.

    MLflow 3 also writes the URI into this process's MLFLOW_TRACKING_URI, which every later config would
    then resolve `tracking.uri` from: the variable is put back as it was.
    """
    import mlflow

    uri = absolute_uri(str(uri))
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


def configure(tracking_cfg) -> str | None:
    """Point MLflow at the configured store and return the experiment id (None when tracking is off).

    Raises:
        TrackingUnavailable: the store can't be reached, created or written within `tracking.timeout` s.
    """
    if not tracking_cfg.enabled:
        return None
    runtime.mlflow_telemetry(bool(tracking_cfg.get("telemetry", False)))  # before mlflow is imported, if it isn't yet
    import mlflow

    try:
        uri = use(tracking_cfg.uri)
    except CnnexpError as err:  # a URL of no scheme cnnexp knows: tracking never decides whether training happens
        raise TrackingUnavailable(str(err)) from err
    key = (uri, str(tracking_cfg.experiment))
    if key in CONTACTS.experiments:
        return CONTACTS.experiments[key]
    if uri in CONTACTS.broken:
        raise TrackingUnavailable(CONTACTS.broken[uri])
    store = check(uri)
    timeout = float(tracking_cfg.get("timeout", 30))
    result: dict = {}

    def contact():
        try:
            # MLflow creates (migrates) a new SQLite store on first contact: one process at a time.
            with store.lock("mlflow"):
                result["id"] = _experiment_id(mlflow, tracking_cfg, uri, store)
        except BaseException as err:  # noqa: BLE001 - reported below, in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=contact, daemon=True, name="mlflow-first-contact")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        reason = f"MLflow store {uri} did not answer within tracking.timeout={timeout:g}s"
    elif "error" in result:
        err = result["error"]
        reason = f"MLflow store {uri} can't be used: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    else:
        CONTACTS.experiments[key] = result["id"]
        return result["id"]
    CONTACTS.broken[uri] = reason
    raise TrackingUnavailable(reason)


def check(uri: str) -> stores.Store:
    """Fail at once, not after minutes of MLflow's retries, on a store we don't know or a SQLite file we can't write
    or that isn't MLflow's.

    MLflow adds its tables to any SQLite file it is pointed at: an Optuna `studies.db` named by mistake
    (MLFLOW_TRACKING_URI=sqlite:///studies.db) is refused before MLflow touches it.
    """
    try:
        store = stores.parse(uri, "tracking.uri", stores.MLFLOW)
        path = store.file if store.scheme.name == "sqlite" else None
        if path is None:
            return store
        kind = stores.store_kind(path)
        if kind not in (None, stores.NAMES[stores.MLFLOW]):
            raise TrackingUnavailable(f"MLflow store {uri}: {path} is {kind}, not an MLflow store; nothing was written "
                                      "to it. Point tracking.uri (or MLFLOW_TRACKING_URI) at another file")
        stores.check_writable(path.parent, "tracking.uri")
        if path.exists():
            with open(path, "r+b"):
                pass
    except TrackingUnavailable:
        raise
    except (CnnexpError, OSError) as err:
        raise TrackingUnavailable(f"MLflow store {uri} can't be written ({getattr(err, 'strerror', None) or err}); "
                                  "point tracking.uri (or MLFLOW_TRACKING_URI) at a writable file") from err
    return store


def _experiment_id(mlflow, tracking_cfg, uri: str, store: stores.Store) -> str:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(str(tracking_cfg.experiment))
    if experiment is None:
        location = None
        if tracking_cfg.artifact_root and store.scheme.lock != "server":
            # A local store keeps artifacts beside it, at an absolute location, so that
            # `make ui` finds them whatever folder a run was started from.
            location = Path(os.path.expanduser(str(tracking_cfg.artifact_root))).resolve().as_uri()
        try:
            return client.create_experiment(str(tracking_cfg.experiment), artifact_location=location,
                                            tags=EXPERIMENT_TAGS)
        except mlflow.exceptions.MlflowException:
            # Another process created it between our lookup and our create.
            experiment = client.get_experiment_by_name(str(tracking_cfg.experiment))
    for key, value in EXPERIMENT_TAGS.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id

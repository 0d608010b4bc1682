"""What the user opens: the MLflow UI and optuna-dashboard pages of a study, and the study's view of its runs.

    python -m cnnexp.ui mlflow-url [--study NAME | --sweep NAME] [--port 5000]
    python -m cnnexp.ui dashboard [--study NAME | --sweep NAME] [--port 8080]

MLflow 3 opens an experiment on its GenAI overview in a fresh browser; `#/experiments/<id>/runs`
opens the runs table instead, and `workflowType=machine_learning` shows the model-training sidebar.
Which columns the runs table shows can't be put in a URL, but MLflow applies a *shared view* (an
experiment tag `mlflow.sharedViewState.<key>`) opened with `?viewStateShareKey=<key>`. Each study
saves one: its trial runs only, the searched values, the objective, test accuracy and model size as
columns, best first.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from urllib.parse import urlencode, urlsplit

from cnnexp import stores
from cnnexp.errors import CnnexpError, StorageError
from cnnexp.tracking import runs
from cnnexp.tracking.store import absolute_uri

DEFAULT_MLFLOW_BASE = "http://127.0.0.1:5000"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow's own prefix; the UI reads it back
ML_WORKFLOW = {"workflowType": "machine_learning"}  # not a view facet: the shared view still applies
CONNECT_TIMEOUT = 5  # seconds an MLflow server may take to accept a connection before the UI says it doesn't answer


def mlflow_base(tracking_uri: str | None = None) -> str:
    """The MLflow UI's address: MLFLOW_UI_BASE, else the tracking server itself, else the local default."""
    if os.environ.get("MLFLOW_UI_BASE"):
        return os.environ["MLFLOW_UI_BASE"].rstrip("/")
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_MLFLOW_BASE


def view_key(study_name: str) -> str:
    """The study's shared-view key (letters, digits, '-' and '_' only: it sits in a tag key and a URL)."""
    return "cnnexp-" + re.sub(r"[^A-Za-z0-9_-]", "_", study_name)


def column(kind: str, key: str) -> str:
    """A runs-table column id as MLflow writes it: column('metrics', 'val_accuracy') -> metrics.`val_accuracy`."""
    return f"{kind}.`{key}`"


def children_filter(parent_run_id: str) -> str:
    return f"tags.`mlflow.parentRunId` = '{parent_run_id}'"


def runs_url(base: str, experiment_id: str, view: str | None = None) -> str:
    """The experiment's runs table (never the GenAI overview); with `view`, the study's shared view."""
    query = {**ML_WORKFLOW, **({"viewStateShareKey": view} if view else {})}
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def filtered_runs_url(base: str, experiment_id: str, parent_run_id: str, metric: str, direction: str) -> str:
    """Without a shared view: the study's trial runs, best first (columns are then chosen by hand)."""
    query = {"searchFilter": children_filter(parent_run_id), "orderByKey": column("metrics", metric),
             "orderByAsc": str(direction == "minimize").lower(), **ML_WORKFLOW}
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def dashboard_url(base: str, study_id: int) -> str:
    return f"{base}/dashboard/studies/{study_id}"


def view_state(parent_run_id: str, searched: list[str], metric: str, direction: str) -> dict:
    """The runs table of one study: its trials, the columns that answer "which was best, and why", best first."""
    columns = [column("params", f"swept.{key}") for key in searched]
    columns += [column("metrics", metric), column("metrics", "final/test_accuracy"),
                column("params", "model.num_params")]
    return {"selectedColumns": columns, "orderByKey": column("metrics", metric),
            "orderByAsc": direction == "minimize", "searchFilter": children_filter(parent_run_id)}


def saved_view(name: str, state: dict) -> str:
    """The tag value: MLflow's saved-view envelope, so the view is also listed by name in the UI."""
    now = int(time.time() * 1000)
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def study_runs_url(tracking_uri: str, base: str, study: str | None = None) -> tuple[str, str]:
    """(study name, URL of its runs) for `study`, else the most recently started study in the store.

    Nothing is written and nothing waits long: a local store must exist and be MLflow's (never an Optuna
    file, which MLflow would add its tables to), a server must take a connection within CONNECT_TIMEOUT
    seconds, and the study name is compared in Python, never pasted into MLflow's filter language.

    Raises:
        StorageError: no such store, a store that isn't MLflow's, a server that doesn't answer, or no study in it.
    """
    uri = check_store(tracking_uri)
    store = stores.parse(uri, "--tracking-uri", stores.MLFLOW)
    path = store.file if store.scheme.name == "sqlite" else None
    if path is not None and not path.exists():
        raise StorageError(f"no MLflow store at {path} yet; run `make sweep` first "
                           f"(MLFLOW_TRACKING_URI={tracking_uri}).")
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, "tags.`cnnexp.role` = 'study'", order_by=["attributes.start_time DESC"])
    found = [run for run in parents if study is None or run.data.tags.get("cnnexp.study") == study]
    if not found:
        which = f"study {study!r}" if study else "study"
        raise StorageError(f"no {which} in the MLflow store {tracking_uri}; run `make sweep` first.")
    parent = found[0]
    name, experiment_id = parent.data.tags["cnnexp.study"], parent.info.experiment_id
    if VIEW_TAG_PREFIX + view_key(name) in client.get_experiment(experiment_id).tags:
        return name, runs_url(base, experiment_id, view_key(name))
    params = parent.data.params
    return name, filtered_runs_url(base, experiment_id, parent.info.run_id, params.get("metric", "val_accuracy"),
                                   params.get("direction", "maximize"))


def check_store(tracking_uri: str) -> str:
    """The store's absolute URI, once read-only checks pass: a SQLite file there is MLflow's, a server answers.

    Raises:
        StorageError: an Optuna study storage or another database named as the MLflow store (MLflow would add its
            tables to it), or a server that does not accept a connection within CONNECT_TIMEOUT seconds.
    """
    try:
        store = stores.parse(absolute_uri(tracking_uri), "--tracking-uri", stores.MLFLOW)
    except CnnexpError as err:
        raise StorageError(str(err)) from None
    uri = store.url
    path = store.file if store.scheme.name == "sqlite" else None
    kind = stores.store_kind(path) if path is not None else None
    if kind not in (None, "an MLflow store"):
        raise StorageError(f"{path} is {kind}, not an MLflow store (tracking URI {tracking_uri}); give --tracking-uri "
                           "the runs' store, e.g. sqlite:///mlflow.db.")
    if store.scheme.name == "http":
        url = urlsplit(uri)
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            with socket.create_connection((url.hostname or "", port), timeout=CONNECT_TIMEOUT):
                pass
        except (OSError, ValueError) as err:
            why = getattr(err, "strerror", None) or err
            raise StorageError(f"the MLflow server {tracking_uri} does not answer ({why}, within {CONNECT_TIMEOUT} s); "
                               "start it (make mlflow-server) or give --tracking-uri another store.") from None
    return uri


def dashboard_target(storage: str, study: str | None = None) -> tuple[str, int, str]:
    """(study name, study id, the storage argument optuna-dashboard takes) for `study`, else the newest study.

    Raises:
        StorageError: the storage file or the study is not there yet.
    """
    import optuna

    store = stores.parse(storage, "--storage")
    path = store.file
    if path is not None and not path.exists():
        raise StorageError(f"no study storage at {path} yet; run `make sweep` first (STORAGE={storage}).")
    kind = stores.store_kind(path) if path is not None and store.scheme.name == "sqlite" else None
    if kind not in (None, "an Optuna study storage"):
        raise StorageError(f"{path} is {kind}, not an Optuna study storage (STORAGE={storage}); give --storage the "
                           "studies' file, e.g. sqlite:///studies.db.")
    try:
        if store.scheme.optuna == "journal":
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            optuna_storage, argument = optuna.storages.JournalStorage(backend), str(path)
        else:  # optuna-dashboard would crash on a file without Optuna's tables: don't create them here
            optuna_storage, argument = optuna.storages.RDBStorage(storage, skip_table_creation=True), storage
        ids = {s.study_name: optuna_storage.get_study_id_from_name(s.study_name)
               for s in optuna_storage.get_all_studies()}
    except Exception as err:  # noqa: BLE001 - e.g. a SQLite file without Optuna's tables
        cause = str(err.__cause__ or err).splitlines()[0][:200]  # Optuna wraps SQLAlchemy's "no such table"
        raise StorageError(f"can't read Optuna studies from {storage} ({cause}); run `make sweep` first.") from err
    if study is not None and study not in ids:
        raise StorageError(f"no study {study!r} in {storage}; studies there: {', '.join(ids) or 'none'}.")
    if not ids:
        raise StorageError(f"no study in {storage} yet; run `make sweep` first.")
    name = study if study is not None else max(ids, key=ids.get)  # the newest: the highest id
    return name, ids[name], argument


def log_searched(run: runs.Run, values: dict) -> None:
    """A trial's searched values as params under short keys (`swept.kernel`), the columns of its study's view.

    Args:
        run: the trial's child run.
        values: the trial's searched values, {override key: value}, e.g. {"kernel": 5, "train.batch_size": 64}.
    """
    run.log_params({f"swept.{key}": value for key, value in values.items()})


def share_study_view(run: runs.Run, study_name: str, searched: list[str], metric: str, direction: str) -> str | None:
    """Save the study's view of its runs in its experiment; return the URL that opens it (tagged `cnnexp.ui_url`).

    The view (MLflow's shared view state, an experiment tag) shows the study's trial runs, with the
    searched values, the objective, test accuracy and model size as columns, best first.

    Args:
        run: the study's parent run.
        study_name: the Optuna study's name.
        searched: the searched keys (logged by `log_searched` as `swept.<key>`).
        metric: the objective, e.g. "val_accuracy".
        direction: "maximize" or "minimize".

    Returns:
        The URL, or None where nothing could be logged.
    """
    import mlflow

    def share() -> str:
        client = run.client()
        experiment_id = client.get_run(run.run_id).info.experiment_id
        key = view_key(study_name)
        state = view_state(run.run_id, searched, metric, direction)
        client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, saved_view(f"study {study_name}", state))
        return runs_url(mlflow_base(mlflow.get_tracking_uri()), experiment_id, key)

    url = run._safely("the study's view of its runs", share)
    if url:
        run.set_tags({f"{runs.TAG_PREFIX}ui_url": url})
    return url

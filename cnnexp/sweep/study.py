"""The Optuna study: storage, sampler, pruner, and the two rules every worker keeps.

1. **`n_trials` is exact across workers and machines.** Optuna's `study.optimize(n_trials=...)`
   counts per process and `MaxTrialsCallback` can overshoot when workers ask at once, so the
   storage itself refuses a new trial once the study holds `n_trials` (a lock around "count, then
   create", held only for that instant). Trials taken from the queue (enqueued repeats, retries
   of a lost worker's trial) are not new and always run.
2. **No configuration is trained twice with the same seed.** A sampler that draws a configuration
   again, a second worker, or a resumed study would otherwise retrain it identically and report
   zero seed noise. `assign_seed` gives such a draw the next seed that configuration has not
   used: it becomes a genuine replicate, and the report counts it as one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from cnnexp.errors import ConfigError, StorageError
from cnnexp.locks import storage_file, store_lock
from cnnexp.tracking import runs

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler",
            "cmaes": "CmaEsSampler", "gp": "GPSampler"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner",
           "hyperband": "HyperbandPruner"}
SEED_KEY = "train.seed"
LOST = "worker lost: no heartbeat (killed, out of memory, or its machine went away)"


class StudyFull(Exception):
    """The study holds its `n_trials` trials: nothing more to ask for."""


def counts_towards_total(trial: optuna.trial.FrozenTrial, retried: set[int]) -> bool:
    """Every trial counts, except repeats (extra seeds) and failures that were retried."""
    if "repeat_of" in trial.user_attrs:
        return False
    return not (trial.state == optuna.trial.TrialState.FAIL and trial.number in retried)


def count_trials(trials: list[optuna.trial.FrozenTrial]) -> int:
    # A retry lists every attempt before it (a lost retry's own retry too): none of those counts.
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    retried |= {t.system_attrs.get("failed_trial") for t in trials} - {None}
    return sum(counts_towards_total(t, retried) for t in trials)


class _Capped:
    """Storage mix-in: refuse a new trial beyond `cap`, and give a lost worker's trial its reason."""

    cap: int | None = None
    lock_url: str = ""

    def _capped(self, create, study_id, template_trial):
        if template_trial is not None or self.cap is None:  # enqueued, retried or added: always allowed
            return create(study_id, template_trial)
        with store_lock(self.lock_url):
            if count_trials(self.get_all_trials(study_id, deepcopy=False)) >= self.cap:
                raise StudyFull
            return create(study_id, template_trial)

    def set_trial_state_values(self, trial_id, state, values=None):
        # Optuna fails a stale trial through this call; our objective always records an error
        # before a trial fails, so a RUNNING trial failed without one lost its worker.
        if state == optuna.trial.TrialState.FAIL:
            trial = self.get_trial(trial_id)
            if trial.state == optuna.trial.TrialState.RUNNING and "error" not in trial.user_attrs:
                self.set_trial_user_attr(trial_id, "error", LOST)
        return super().set_trial_state_values(trial_id, state, values)


class CappedRDBStorage(_Capped, optuna.storages.RDBStorage):
    def _create_new_trial(self, study_id, template_trial=None):  # what Optuna's cache layer calls
        return self._capped(super()._create_new_trial, study_id, template_trial)


class CappedJournalStorage(_Capped, optuna.storages.JournalStorage):
    def create_new_trial(self, study_id, template_trial=None):
        return self._capped(super().create_new_trial, study_id, template_trial)


def make_storage(url: str, settings=None, cap: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL: RDB (SQLite, PostgreSQL, ...) with heartbeats, or a journal file.

    Heartbeats let any worker fail a trial whose worker died; the callback then closes its
    MLflow run and, with `sweep.retry_failed`, queues it again to resume from its checkpoint.
    """
    check_storage(url)
    get = (lambda key, default: settings.get(key, default)) if settings is not None else (lambda k, d: d)
    if url.startswith("journal:"):
        path = storage_file(url)
        storage = CappedJournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    else:
        engine_kwargs = {}
        if url.startswith("sqlite"):
            # Wait for the lock instead of failing with "database is locked" when workers share the file.
            engine_kwargs["connect_args"] = {"timeout": 120}
        else:
            engine_kwargs["pool_pre_ping"] = True
        storage = CappedRDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=int(get("heartbeat_interval", 10)),
            grace_period=int(get("grace_period", 60)),
            heartbeat_stale_trial_callback=StaleTrialCallback(int(get("retry_failed", 1))),
        )
    storage.cap, storage.lock_url = cap, url
    return storage


def check_storage(url: str) -> None:
    """A storage file whose folder can't be written fails here, in one line, before any training."""
    path = storage_file(url)
    if path is None:
        return
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"sweep.storage={url}: can't create folder {folder} ({err.strerror}).") from err
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StorageError(f"sweep.storage={url}: {path if path.exists() else folder} is not writable; "
                           "point sweep.storage at a writable place.")


class StaleTrialCallback:
    """Called by Optuna when a trial's heartbeat went stale: its worker is gone."""

    def __init__(self, retries: int):
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=retries, inherit_intermediate_values=True) if retries else None

    def __call__(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        run_id = frozen.user_attrs.get("mlflow_run_id")
        if run_id and study.user_attrs.get("mlflow_tracking_uri"):
            import mlflow

            mlflow.set_tracking_uri(study.user_attrs["mlflow_tracking_uri"])
            run = runs.Run(run_id)
            will_retry = self.retry is not None and len(frozen.system_attrs.get("retry_history", [])) < self.retry._max_retry
            run.set_tags({"optuna.trial_state": "FAIL" if not will_retry else "RETRYING"})
            run.end("FAILED", error=LOST + ("; resumed from its last checkpoint by another worker" if will_retry else ""))
        if self.retry is not None:
            self.retry(study, frozen)


def make_sampler(settings, space: dict) -> optuna.samplers.BaseSampler:
    from cnnexp.sweep.space import grid_of

    options = OmegaConf.to_container(settings.sampler, resolve=True)
    name = options.pop("name", "tpe")
    if name not in SAMPLERS:
        raise ConfigError(f"sweep.sampler.name={name!r} is unknown; use one of {', '.join(SAMPLERS)}.")
    if name == "grid":
        options["search_space"] = grid_of(space)
    if name == "gp":
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise ConfigError("sweep.sampler.name=gp needs PyTorch: pip install -e '.[gp]'.") from err
    try:
        return getattr(optuna.samplers, SAMPLERS[name])(**options)
    except TypeError as err:
        raise ConfigError(f"sweep.sampler: {err}") from err


def make_pruner(settings) -> optuna.pruners.BasePruner:
    options = OmegaConf.to_container(settings.pruner, resolve=True)
    name = options.pop("name", "none")
    if name not in PRUNERS:
        raise ConfigError(f"sweep.pruner.name={name!r} is unknown; use one of {', '.join(PRUNERS)}.")
    try:
        return getattr(optuna.pruners, PRUNERS[name])(**options)
    except TypeError as err:
        raise ConfigError(f"sweep.pruner: {err}") from err


def open_study(settings, space: dict, metric_names: list[str] | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (resume), with the configured sampler and pruner."""
    check_storage(str(settings.storage))
    # Workers starting at once: one creates the storage's tables (Optuna's migrations race otherwise)
    # and the study, the others find them.
    with store_lock(str(settings.storage)):
        storage = make_storage(str(settings.storage), settings, cap=int(settings.n_trials))
        study = optuna.create_study(
            study_name=str(settings.study_name), storage=storage, sampler=make_sampler(settings, space),
            pruner=make_pruner(settings), direction=str(settings.direction), load_if_exists=True,
        )
        if metric_names and study.metric_names != metric_names:
            study.set_metric_names(metric_names)  # the dashboard shows val_accuracy, not "Objective 0"
    return study


def load_study(name: str, url: str) -> optuna.Study:
    storage = make_storage(url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise ConfigError(f"No study {name!r} in {url}; studies there: {', '.join(names) or 'none'}.")
    return optuna.load_study(study_name=name, storage=storage)


def config_key(params: dict) -> str:
    """A configuration's identity: its searched values, the seed left out."""
    return json.dumps({k: v for k, v in sorted(params.items()) if k != SEED_KEY}, default=str)


def assign_seed(study: optuna.Study, trial: optuna.Trial, wanted: int, lock_url: str) -> tuple[int, int]:
    """The seed this trial trains with, and how many earlier runs of its configuration there are.

    `wanted` (the base seed, or the searched `train.seed`) is kept unless that configuration
    already used it; then the next unused seed is taken. Held under the study lock, so two
    workers that drew the same configuration at once still get different seeds.
    """
    key = config_key(trial.params)
    with store_lock(lock_url):
        used = {t.user_attrs["seed"] for t in study.get_trials(deepcopy=False)
                if t.number != trial.number and "seed" in t.user_attrs and config_key(t.params) == key}
        seed = wanted
        while seed in used:
            seed += 1
        trial.set_user_attr("seed", seed)
    return seed, len(used)


def checkpoint_root(settings) -> Path:
    """Per-trial checkpoints: `sweep.checkpoint_dir`, else beside the storage (shared by its workers)."""
    if settings.get("checkpoint_dir"):
        return Path(os.path.expanduser(str(settings.checkpoint_dir)))
    path = storage_file(str(settings.storage))
    return (path.parent if path else Path(str(settings.output_dir))) / "checkpoints" / str(settings.study_name)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial, or None (Optuna raises when none is complete)."""
    try:
        return study.best_trial
    except ValueError:
        return None

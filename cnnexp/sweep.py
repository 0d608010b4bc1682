"""Sweep stage: an Optuna study over a search space written in Hydra's sweep grammar.

    python -m cnnexp.sweep --sweep kernel_size
    python -m cnnexp.sweep --sweep quick 'kernel=choice(2,3,4,5,6,7)' sweep.n_trials=6 train.epochs=1

Every trial is exactly `python -m cnnexp.run <fixed overrides> <trial overrides>`, run in this
process (see `run_trial`), logged as an MLflow child run of the study's parent run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnexp import SWEEPS_DIR, runtime, tracking
from cnnexp.config import ConfigError, compose_config, overrides_to_command
from cnnexp.run import USER_ERRORS, run

log = logging.getLogger("cnnexp.sweep")
# Heartbeats and stale-trial checks are what cluster workers rely on; Optuna still calls them experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# What a sweep YAML may hold; `sweep.sampler` and `sweep.pruner` take extra keyword arguments.
DEFAULTS = {
    "sweep": {
        "study_name": None,         # default: the sweep file's name
        "direction": "maximize",
        "metric": "val_accuracy",   # the test split is for the final score only
        "n_trials": 10,             # total for the study, across reruns and workers
        "timeout": None,            # seconds for this invocation
        "storage": "sqlite:///studies.db",
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
        "repeats": 0,               # re-train the best configurations with this many other seeds
        "repeat_top": 3,
        "log_models": "best",       # best | all | none
        "workers": 1,               # worker processes on this machine (more can join from others)
        "heartbeat_interval": 10,   # seconds; a trial silent for grace_period is failed as stale
        "grace_period": 60,
        "retry_failed": 0,          # re-run a stale (lost-worker) trial up to this many times
        # TensorFlow keeps ~20 MB per trained model that clear_session() does not return
        # (measured by `make bench`); the CLI restarts its process after this many trials.
        "recycle_after": 10,
        "estimate": True,           # print a time estimate before a sweep on a machine without GPU
        "output_dir": "outputs/sweeps",
    },
    "description": "",
    "overrides": [],
    "params": {},
}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler",
            "cmaes": "CmaEsSampler", "gp": "GPSampler"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner",
           "hyperband": "HyperbandPruner"}
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


@dataclass
class Sweep:
    """A loaded sweep: its settings, search space and the overrides every trial shares."""

    settings: DictConfig
    space: dict[str, object]            # override key -> Hydra sweep object (ChoiceSweep, ...)
    overrides: list[str]                # fixed overrides, shared by every trial
    base: DictConfig                    # the config every trial starts from (fixed overrides applied)
    add_keys: set[str] = field(default_factory=set)  # keys that need '+' (not in the config)


# --------------------------------------------------------------------------------------------
# Loading a sweep and its search space


def sweep_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = SWEEPS_DIR / f"{name}.yaml"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
        raise ConfigError(f"No sweep {name!r} in {SWEEPS_DIR}; available: {available}.")
    return path


def load_sweep(name: str, cli_overrides: Sequence[str] = ()) -> Sweep:
    """Read `sweeps/<name>.yaml` and apply command-line overrides.

    Command-line overrides are sorted the Hydra way: `sweep.*` changes a setting, a sweep
    expression (`choice`, `range`, `interval`, `tag(log, ...)`) adds or replaces a searched
    parameter, anything else is a fixed override for every trial.
    """
    path = sweep_path(name)
    base = OmegaConf.create(DEFAULTS)
    loaded = OmegaConf.load(path)
    OmegaConf.set_struct(base, True)
    for node in (base.sweep.sampler, base.sweep.pruner, base.params):
        OmegaConf.set_struct(node, False)
    try:
        merged = OmegaConf.merge(base, loaded)
    except Exception as err:  # noqa: BLE001 - OmegaConf's key errors name the key
        raise ConfigError(f"{path}: {err}") from err

    parser = OverridesParser.create()
    params = {str(k).lstrip("+"): str(v) for k, v in merged.params.items()}
    fixed = list(merged.overrides)
    for text in cli_overrides:
        if text.startswith("sweep."):
            key, _, value = text.partition("=")
            try:
                OmegaConf.update(merged, key, _yaml_value(value), merge=False)
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"Unknown sweep setting {key!r}: {err}") from err
            continue
        override = parser.parse_overrides([text])[0]
        if override.is_sweep_override():
            params[override.key_or_group.lstrip("+")] = text.partition("=")[2]
        else:
            fixed.append(text)

    space = {}
    for key, expression in params.items():
        parsed = parser.parse_overrides([f"{key}={expression}"])[0]
        if not parsed.is_sweep_override():
            raise ConfigError(f"params.{key}: {expression!r} is not a sweep expression such as choice(...).")
        space[key] = parsed.value()
    if not space:
        raise ConfigError(f"{path} searches nothing: add params (e.g. kernel: choice(3,5,7)).")

    settings = merged.sweep
    settings.study_name = settings.study_name or path.stem
    # Which searched keys need '+': those the composed config does not have (the shortcuts).
    base_cfg = compose_config(fixed)
    add_keys = {key for key in space if OmegaConf.select(base_cfg, key, default="__absent__") == "__absent__"}
    return Sweep(settings=settings, space=space, overrides=fixed, base=base_cfg, add_keys=add_keys)


def _yaml_value(text: str):
    import yaml

    return yaml.safe_load(text) if text else None


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """Ask Optuna for one value per searched key, mapping Hydra's grammar onto distributions."""
    values = {}
    for key, sweep in space.items():
        if isinstance(sweep, ChoiceSweep):
            choices = [_choice_token(v) for v in sweep.list]
            values[key] = trial.suggest_categorical(key, choices)
        elif isinstance(sweep, RangeSweep):
            start, stop, step = sweep.start, sweep.stop, sweep.step
            if all(isinstance(v, int) for v in (start, stop, step)):
                high = start + step * ((stop - 1 - start) // step)
                values[key] = trial.suggest_int(key, start, high, step=step)
            else:
                count = int(math.floor((stop - start) / step - 1e-9)) + 1
                values[key] = trial.suggest_float(key, start, start + step * (count - 1), step=step)
        elif isinstance(sweep, IntervalSweep):
            log_scale = "log" in sweep.tags
            if "int" in sweep.tags or (isinstance(sweep.start, int) and isinstance(sweep.end, int) and not log_scale):
                values[key] = trial.suggest_int(key, int(sweep.start), int(sweep.end), log=log_scale)
            else:
                values[key] = trial.suggest_float(key, float(sweep.start), float(sweep.end), log=log_scale)
        else:
            raise ConfigError(f"params.{key}: {type(sweep).__name__} is not supported; use choice, range or interval.")
    return values


def _choice_token(value):
    """Optuna's categorical values must be scalars: lists become their override text."""
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return value


def grid_of(space: dict) -> dict[str, list]:
    grid = {}
    for key, sweep in space.items():
        if isinstance(sweep, ChoiceSweep):
            grid[key] = [_choice_token(v) for v in sweep.list]
        elif isinstance(sweep, RangeSweep):
            grid[key] = list(_frange(sweep.start, sweep.stop, sweep.step))
        else:
            raise ConfigError(f"sweep.sampler.name=grid needs choice(...) or range(...); params.{key} is an interval.")
    return grid


def _frange(start, stop, step):
    value = start
    while value < stop:
        yield value
        value += step


def trial_overrides(sweep: Sweep, values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        prefix = "+" if key in sweep.add_keys else ""
        out.append(f"{prefix}{key}={value}")
    return out


# --------------------------------------------------------------------------------------------
# Optuna objects from YAML


def make_sampler(settings, space: dict) -> optuna.samplers.BaseSampler:
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


def make_storage(url: str, settings=None) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL: RDB (SQLite, PostgreSQL, ...) with heartbeats, or a journal file.

    Heartbeats let any worker fail a trial whose worker died (SIGKILL, lost node); the
    callback then closes that trial's MLflow run and, if asked, retries the trial.
    """
    if url.startswith("journal:"):
        path = url.removeprefix("journal:").removeprefix("//")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # Wait for the lock instead of failing with "database is locked" when workers share the file.
        engine_kwargs["connect_args"] = {"timeout": 120}
        db_file = url.removeprefix("sqlite:///")
        if db_file and not db_file.startswith(":"):
            Path(db_file).parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_pre_ping"] = True
    interval = int(settings.heartbeat_interval) if settings is not None else DEFAULTS["sweep"]["heartbeat_interval"]
    grace = int(settings.grace_period) if settings is not None else DEFAULTS["sweep"]["grace_period"]
    retries = int(settings.retry_failed) if settings is not None else 0
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=interval, grace_period=grace,
        heartbeat_stale_trial_callback=_StaleTrialCallback(retries),
    )


class _StaleTrialCallback:
    """Called by Optuna when a trial's heartbeat went stale: its worker is gone."""

    def __init__(self, retries: int):
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries) if retries else None

    def __call__(self, study, frozen) -> None:
        run_id = frozen.user_attrs.get("mlflow_run_id")
        if run_id:
            run = tracking.Run(run_id)
            run.set_tags({"optuna.trial_state": "FAIL", "error": "worker lost: no heartbeat (killed or crashed)"})
            run.end("FAILED")
        if self.retry is not None:
            self.retry(study, frozen)


def open_study(sweep: Sweep) -> optuna.Study:
    """Create the study, or load it when it exists (resume), with the configured sampler and pruner."""
    from cnnexp.workers import trial_slot_lock

    settings = sweep.settings
    with trial_slot_lock(str(settings.storage)):  # many workers starting at once: one creates
        return optuna.create_study(
            study_name=settings.study_name,
            storage=make_storage(str(settings.storage), settings),
            sampler=make_sampler(settings, sweep.space),
            pruner=make_pruner(settings),
            direction=str(settings.direction),
            load_if_exists=True,
        )


# --------------------------------------------------------------------------------------------
# Trials


class _Interrupted(KeyboardInterrupt):
    """SIGTERM (scancel, Kubernetes) handled like Ctrl-C: mark the trial, close the runs, exit."""


# Set by SIGTERM. Raising from the handler can land inside library code that swallows it, so
# the flag is also checked at every batch end and before every trial.
_STOP_REQUESTED = threading.Event()


def _on_sigterm(signum, frame):
    _STOP_REQUESTED.set()
    raise _Interrupted(f"signal {signum}")


def _epoch_callback(trial: optuna.Trial, metric: str, bar):
    """Report the objective each epoch (step = epoch index) and prune between epochs.

    Steps are absolute epoch numbers, so when `train.epochs` is itself searched the pruner
    compares trials after the same number of epochs: like with like.
    """
    keras = runtime.keras()

    class ReportAndPrune(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if _STOP_REQUESTED.is_set():
                raise _Interrupted("SIGTERM")

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(metric)
            if value is None:
                return
            bar.write(f"  trial {trial.number} epoch {epoch + 1}: " + "  ".join(
                f"{k}={v:.4f}" for k, v in sorted((logs or {}).items())))
            if not math.isfinite(float(value)):
                return  # the NaN guard in train fails the trial with the reason
            trial.report(float(value), step=epoch)
            # Pruning after the last epoch saves nothing and would throw a finished result away.
            if epoch + 1 < self.params.get("epochs", epoch + 2) and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} ({metric}={value:.4f})")

    return ReportAndPrune()


def run_trial(study: optuna.Study, trial: optuna.Trial, sweep: Sweep, parent_run_id: str | None, bar,
              extra_overrides: Sequence[str] = (), tags: dict | None = None) -> optuna.trial.FrozenTrial:
    """Run one trial in this process and tell Optuna its outcome; never raises for a bad trial.

    In-process trials share the decoded dataset and the imported TensorFlow (seconds per
    trial); `keras.backend.clear_session()` and a fresh seed start each one clean.
    """
    settings = sweep.settings
    values = suggest(trial, sweep.space)
    overrides = [*sweep.overrides, *trial_overrides(sweep, values), *extra_overrides]
    command = overrides_to_command(overrides)
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("command", command)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}:{os.environ.get('CNNEXP_WORKER', '0')}")
    child_tags = {
        "optuna.study_name": settings.study_name, "optuna.trial_number": trial.number,
        "optuna.trial_state": "RUNNING", "cnnexp.command": command, **(tags or {}),
    }
    child = _start_child(sweep, trial, parent_run_id, child_tags)
    if child:
        trial.set_user_attr("mlflow_run_id", child)
    state, value, error = optuna.trial.TrialState.FAIL, None, None
    metrics = {}
    try:
        cfg = compose_config([*overrides, "tracking.log_model=false", "train.verbose=0"])
        metrics = run(cfg, overrides=overrides, callbacks=[_epoch_callback(trial, settings.metric, bar)],
                      parent_run_id=parent_run_id, run_id=child, run_name=f"trial-{trial.number}")
        value = float(metrics[settings.metric])
        if not math.isfinite(value):
            raise ValueError(f"{settings.metric} is {value}")
        state = optuna.trial.TrialState.COMPLETE
    except optuna.TrialPruned as err:
        state, error = optuna.trial.TrialState.PRUNED, str(err)
    except KeyboardInterrupt as err:
        error = f"interrupted ({str(err) or 'Ctrl-C'}); rerun the sweep to resume"
        _finish(study, trial, state, None, error, child, settings)
        raise
    except Exception as err:  # noqa: BLE001 - a failing trial never kills the sweep
        error = f"{type(err).__name__}: {err}"
        if not isinstance(err, USER_ERRORS):
            log.debug("trial %d failed", trial.number, exc_info=True)
    for key in ("test_accuracy", "test_loss", "epochs_run", "train_seconds", "images_per_second", "params"):
        if key in metrics:
            trial.set_user_attr(key, metrics[key])
    frozen = _finish(study, trial, state, value, error, child, settings)
    if state == optuna.trial.TrialState.COMPLETE and child and _is_new_best(study, frozen, settings):
        tracking.Run(child).log_model(metrics["model"], metrics["example"])
    elif state == optuna.trial.TrialState.COMPLETE and child and settings.log_models == "all":
        tracking.Run(child).log_model(metrics["model"], metrics["example"])
    metrics.clear()  # drop the model before the next trial
    return frozen


def _is_new_best(study, frozen, settings) -> bool:
    if settings.log_models != "best":
        return False
    others = [t.value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if t.number != frozen.number and t.value is not None]
    if not others:
        return True
    better = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return better(others + [frozen.value]) == frozen.value and frozen.value not in others


def _finish(study, trial, state, value, error, child, settings):
    if error:
        trial.set_user_attr("error", error[:2000])
    label = state.name
    try:
        frozen = study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state,
                            skip_if_finished=True)
    except RuntimeError as err:
        # GridSampler calls study.stop() once the grid is covered, which only works inside
        # study.optimize; the trial's state is stored before that, so the record is complete.
        if "Study.stop" not in str(err):
            raise
        frozen = study.get_trials(deepcopy=False)[trial.number]
    if child:
        run = tracking.Run(child)
        run.set_tags({"optuna.trial_state": label, **({"error": error[:5000]} if error else {})})
        if state == optuna.trial.TrialState.PRUNED:
            run.end("KILLED")  # MLflow has no "pruned": KILLED plus the state tag
        elif state == optuna.trial.TrialState.FAIL:
            run.end("KILLED" if error and error.startswith("interrupted") else "FAILED")
    return frozen


def _start_child(sweep, trial, parent_run_id, tags) -> str | None:
    if parent_run_id is None:
        return None
    with tracking_errors_as_warnings():
        from mlflow import MlflowClient

        experiment_id = tracking.configure(sweep.base.tracking)
        created = MlflowClient().create_run(
            experiment_id, run_name=f"trial-{trial.number}", tags={"mlflow.parentRunId": parent_run_id, **{
                k: str(v) for k, v in tags.items()}},
        )
        return created.info.run_id
    return None


class tracking_errors_as_warnings:
    """MLflow being down costs the record in MLflow, never the trial or the study."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is not None and isinstance(err, Exception):
            warnings.warn(f"MLflow: not logged: {err}", stacklevel=2)
            return True
        return False


def parent_run(sweep: Sweep, known_id: str | None = None) -> str | None:
    """The study's MLflow parent run: found again on resume, never duplicated.

    Args:
        known_id: the parent recorded in the study's attributes by an earlier run or worker.
    """
    if not sweep.base.tracking.enabled:
        return None
    with tracking_errors_as_warnings():
        from mlflow import MlflowClient

        experiment_id = tracking.configure(sweep.base.tracking)
        client = MlflowClient()
        name = sweep.settings.study_name
        if known_id:
            with tracking_errors_as_warnings():
                client.update_run(client.get_run(known_id).info.run_id, status="RUNNING")
                return known_id
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`cnnexp.study` = '{name}' and tags.`cnnexp.role` = 'study'",
            order_by=["attributes.start_time ASC"], max_results=1,
        )
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        created = client.create_run(experiment_id, run_name=f"study-{name}", tags={
            "cnnexp.study": name, "cnnexp.role": "study", "mlflow.source.git.commit": runtime.git_commit() or "",
        })
        run = tracking.Run(created.info.run_id)
        run.log_params({
            "study_name": name, "direction": sweep.settings.direction, "metric": sweep.settings.metric,
            "n_trials": sweep.settings.n_trials, "storage": sweep.settings.storage,
            "sampler": OmegaConf.to_container(sweep.settings.sampler), "pruner": OmegaConf.to_container(sweep.settings.pruner),
            "overrides": " ".join(sweep.overrides),
            **{f"space.{k}": str(v) for k, v in sweep.space.items()},
        })
        return created.info.run_id
    return None


# --------------------------------------------------------------------------------------------
# The study loop


def count_trials(study: optuna.Study) -> int:
    """Trials that count towards n_trials: all of them, except failures that were retried."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    return sum(1 for t in trials if not (t.state == optuna.trial.TrialState.FAIL and t.number in retried))


def _next_trial(study: optuna.Study, total: int, storage_url: str):
    """Under the study-wide lock: fail stale trials, count, and ask only if the total allows."""
    from cnnexp.workers import trial_slot_lock

    with trial_slot_lock(storage_url):
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
        if count_trials(study) >= total and not waiting:
            running = any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
            return "wait" if running else None
        with warnings.catch_warnings():
            # "Heartbeat ... supposed to be used with Study.optimize": we beat ourselves (_heartbeat).
            warnings.simplefilter("ignore")
            return study.ask()


class RecycleProcess(Exception):
    """This process ran `sweep.recycle_after` trials: start afresh to give TensorFlow's memory back."""


def optimize(sweep: Sweep, show_progress: bool = True, recycle_after: int | None = None) -> optuna.Study:
    """Run trials until the study holds `sweep.n_trials` trials (all states), or the timeout.

    Rerunning resumes: finished trials are kept and never re-run; trials left RUNNING by a
    killed worker are failed by Optuna's heartbeat check before new ones are asked for.
    """
    from tqdm import tqdm

    from cnnexp.workers import trial_slot_lock

    settings = sweep.settings
    study = open_study(sweep)
    with trial_slot_lock(str(settings.storage)):  # one parent run, however many workers start
        parent = parent_run(sweep, study.user_attrs.get("mlflow_parent_run_id"))
        study.set_user_attr("metric", str(settings.metric))
        if parent:
            import mlflow

            study.set_user_attr("mlflow_parent_run_id", parent)
            study.set_user_attr("mlflow_tracking_uri", mlflow.get_tracking_uri())
    total = int(settings.n_trials)
    start = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    bar = tqdm(total=total, initial=min(count_trials(study), total), desc=settings.study_name, unit="trial",
               disable=not show_progress, dynamic_ncols=True)
    waited, ran = False, 0
    _STOP_REQUESTED.clear()
    try:
        while True:
            if settings.timeout and time.monotonic() - start > float(settings.timeout):
                bar.write(f"sweep.timeout={settings.timeout}s reached; rerun to continue the study.")
                break
            if _STOP_REQUESTED.is_set():
                raise _Interrupted("SIGTERM")
            trial = _next_trial(study, total, str(settings.storage))
            if trial is None:
                break
            if trial == "wait":  # other workers' trials are still running (or stale, soon failed)
                if not waited:
                    bar.write("Waiting for trials still running in other workers (a dead worker's trial "
                              f"fails after sweep.grace_period={settings.grace_period}s without heartbeat).")
                    waited = True
                time.sleep(min(float(settings.heartbeat_interval), 5.0))
                continue
            with _heartbeat(study, trial):
                frozen = run_trial(study, trial, sweep, parent, bar)
            ran += 1
            bar.update(1)
            best = _best(study)
            bar.set_postfix_str(f"best {settings.metric}={best.value:.4f} (#{best.number})" if best else "no trial complete yet")
            bar.write(f"trial {frozen.number}: {frozen.state.name}"
                      + (f" {settings.metric}={frozen.value:.4f}" if frozen.value is not None else "")
                      + (f" — {frozen.user_attrs.get('error')}" if frozen.user_attrs.get("error") else ""))
            if recycle_after and ran >= recycle_after and count_trials(study) < total:
                raise RecycleProcess
        if int(settings.repeats) > 0:
            run_repeats(sweep, study, parent, bar)
    except KeyboardInterrupt:
        bar.write("Interrupted: the running trial is marked FAIL, the study is saved; rerun the same command to resume.")
        _end_parent(parent, "KILLED")
        raise
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return study


@contextlib.contextmanager
def _heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Optuna's own heartbeat thread for an ask/tell trial (study.optimize starts it for you).

    A killed worker's trial stops beating and is failed as stale by the next worker that asks.
    """
    from optuna.storages._heartbeat import get_heartbeat_thread

    thread = get_heartbeat_thread(trial._trial_id, study._storage)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _best(study: optuna.Study):
    try:
        return study.best_trial
    except ValueError:
        return None


def _end_parent(parent: str | None, status: str) -> None:
    if parent:
        tracking.Run(parent).end(status)


def run_repeats(sweep: Sweep, study: optuna.Study, parent: str | None, bar) -> optuna.Study:
    """Re-train the best `repeat_top` configurations with `repeats` other seeds, to measure noise.

    They go to a study of their own (`<name>.repeats`), so that the main study's sampler and
    trial count stay untouched; a rerun finishes only the missing repeats.
    """
    settings = sweep.settings
    completed = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                       key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    top = completed[: int(settings.repeat_top)]
    repeat_study = optuna.create_study(
        study_name=f"{settings.study_name}.repeats", storage=make_storage(str(settings.storage), settings),
        direction=str(settings.direction), load_if_exists=True, sampler=optuna.samplers.RandomSampler(seed=0),
    )
    for source in top:
        for r in range(1, int(settings.repeats) + 1):
            seed = int(sweep.base.train.seed) + 1000 * r
            repeat_study.enqueue_trial(source.params, user_attrs={"repeat_of": source.number, "seed": seed},
                                       skip_if_exists=True)
    # Fixed params: the enqueued trials carry the configuration; the seed comes from the attrs.
    while any(t.state == optuna.trial.TrialState.WAITING for t in repeat_study.get_trials(deepcopy=False)):
        trial = repeat_study.ask()
        seed = trial.user_attrs.get("seed")
        if seed is None:  # another worker took the last waiting trial
            repeat_study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        with _heartbeat(repeat_study, trial):  # the enqueued params are fixed: suggest() returns them
            frozen = run_trial(repeat_study, trial, sweep, parent, bar,
                               extra_overrides=[f"train.seed={seed}"],
                               tags={"cnnexp.repeat_of": trial.user_attrs["repeat_of"]})
        bar.write(f"repeat of trial {trial.user_attrs['repeat_of']} (seed {seed}): {frozen.state.name} "
                  + (f"{settings.metric}={frozen.value:.4f}" if frozen.value is not None else ""))
    return repeat_study


# --------------------------------------------------------------------------------------------
# Before a long sweep: say what it will cost


def estimate(sweep: Sweep) -> str | None:
    """On a machine without GPU, a rough duration from one timed training step of the base config."""
    if runtime.has_gpu():
        return None
    from cnnexp.model import build_model
    from cnnexp.run import prepare
    from cnnexp.train import make_optimizer

    cfg = sweep.base
    layers, dataset = prepare(cfg)
    keras = runtime.keras()
    model = build_model(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding)
    model.compile(optimizer=make_optimizer(cfg.train), loss="sparse_categorical_crossentropy")
    batch = int(cfg.train.batch_size)
    x, y = dataset.x_train[:batch], dataset.y_train[:batch]
    model.train_on_batch(x, y)  # compile the step first
    began = time.perf_counter()
    for _ in range(3):
        model.train_on_batch(x, y)
    per_image = (time.perf_counter() - began) / (3 * len(y))
    keras.backend.clear_session()
    epochs = _max_epochs(sweep, cfg)
    images = len(dataset.y_train) * epochs * int(sweep.settings.n_trials)
    minutes = images * per_image * 1.3 / 60  # +30% for validation and evaluation
    return (f"No GPU found ({runtime.device_description()}): up to {sweep.settings.n_trials} trials x "
            f"{epochs} epochs x {len(dataset.y_train)} images at ~{1 / per_image:.0f} images/s of the base "
            f"model = roughly {minutes:.1f} min of training (pruning and other architectures change this). "
            "The data is not shrunk; set dataset.train_limit for a quicker look.")


def _max_epochs(sweep: Sweep, cfg) -> int:
    space = sweep.space.get("train.epochs")
    if isinstance(space, ChoiceSweep):
        return max(int(v) for v in space.list)
    if isinstance(space, RangeSweep):
        return int(max(_frange(space.start, space.stop, space.step)))
    if isinstance(space, IntervalSweep):
        return int(space.end)
    return int(cfg.train.epochs)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnnexp.sweep", description=__doc__.split("\n\n")[0],
        epilog="Overrides: sweep.<setting>=..., a search space such as 'kernel=choice(2,3,4)', "
               "or any cnnexp.run override (train.epochs=1).",
    )
    parser.add_argument("--sweep", default="seed_questions", help="a name in sweeps/ or a YAML path")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("optuna", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        sweep = load_sweep(args.sweep, args.overrides)
        if int(sweep.settings.workers) > 1:
            from cnnexp.workers import run_workers

            return run_workers(sweep, args)
        if sweep.settings.estimate and os.environ.get("CNNEXP_WORKER") is None:
            message = estimate(sweep)
            if message:
                print(message, flush=True)
        study = optimize(sweep, recycle_after=int(sweep.settings.recycle_after))
    except RecycleProcess:
        # Same command, same process id (Slurm, Kubernetes and sweep.workers keep tracking it).
        print(f"Restarting this worker after {sweep.settings.recycle_after} trials to free memory.", flush=True)
        os.environ.setdefault("CNNEXP_WORKER", "0")  # the restarted process skips the estimate
        os.execv(sys.executable, [sys.executable, "-m", "cnnexp.sweep", *sys.argv[1:]])
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return finish(sweep, study, report=not args.no_report)


def finish(sweep: Sweep, study: optuna.Study, report: bool = True) -> int:
    """Write the report, attach it to the parent run, and say how the sweep went (exit code)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if report:
        from cnnexp.report import write_report

        out = write_report(study, sweep.settings, parent_run_id=parent)
        print(out.read_text() if out.suffix == ".md" else out)
    if parent:
        _end_parent(parent, "FINISHED" if complete else "FAILED")
    if not complete:
        print(f"error: no trial of study {sweep.settings.study_name!r} completed; see the trials' 'error' attributes.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Optuna study: storage, sampler, pruner, and the two rules every worker keeps, on Optuna's public API.

1. **`n_trials` is exact across workers and machines.** Optuna's `study.optimize(n_trials=...)`
   counts per process and `MaxTrialsCallback` can overshoot when workers ask at once, so every
   `ask` (the one `study.optimize` makes for each trial) holds the study-wide lock while it counts
   the trials and creates the next one: `CappedStudy.ask`. Queued trials (designed cells,
   repeats, retries of a lost worker's trial) are not new and always run.
2. **No configuration is trained twice with the same seed.** A sampler that draws a configuration
   again, a second worker, or a resumed study would otherwise retrain it identically and report
   zero seed noise. `assign_seed` gives such a draw the next seed that configuration has not
   used: it becomes a genuine replicate, and the report counts it as one. In a designed study no
   two runs share a seed at all (see `assign_seed`).

Before anything is written, the storage is checked: a corrupt or foreign SQLite file, a full
disk, or a study of this name with another search space is one line, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from cnnexp import record, stores
from cnnexp.design import Design, config_key
from cnnexp.errors import ConfigError, StorageError
from cnnexp.study.settings import PRUNERS, SAMPLERS, constraint, objectives
from cnnexp.study.space import distribution, grid_of

LOST = "worker lost: no heartbeat (killed, out of memory, or its machine went away)"
UNPREPARED = "could not be prepared"  # a trial that failed before training: it does not count towards n_trials
WAITING = optuna.trial.TrialState.WAITING


class StudyFull(Exception):
    """The study holds its `n_trials` trials: nothing more to ask for."""


def count_trials(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count towards `n_trials`: all but repeats (extra seeds), later rounds (confirmations too),
    retried failures and trials that failed before they trained."""
    retried = {n for t in trials for n in record.retry_history(t)}
    total = 0
    for t in trials:
        facts = record.read_trial(t)
        failed = t.state.name == "FAIL"
        if facts.repeat_of is None and facts.round == 1 and not (failed and t.number in retried) \
                and not (failed and (facts.error or "").startswith(UNPREPARED)):
            total += 1
    return total


class CappedStudy(optuna.Study):
    """A study whose `ask` refuses a new trial once the study holds `cap`, counted under the study lock."""

    def __init__(self, *args, cap: int | None = None, lock_url: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.cap, self.lock_url = cap, lock_url

    def ask(self, fixed_distributions=None):
        if self.cap is None:
            return super().ask(fixed_distributions)
        with stores.lock(self.lock_url):
            trials = self.get_trials(deepcopy=False)
            if not any(t.state == WAITING for t in trials) and count_trials(trials) >= self.cap:
                raise StudyFull
            return super().ask(fixed_distributions)


class LostWorkerStorage(optuna.storages.RDBStorage):
    """RDB storage that records why a trial failed when Optuna fails it for a stale heartbeat."""

    def set_trial_state_values(self, trial_id, state, values=None):
        # Our objective always records an error before a trial fails, so a RUNNING trial failed
        # without one lost its worker.
        if state == optuna.trial.TrialState.FAIL:
            trial = self.get_trial(trial_id)
            if trial.state == optuna.trial.TrialState.RUNNING and "error" not in trial.user_attrs:
                self.set_trial_user_attr(trial_id, "error", LOST)
        return super().set_trial_state_values(trial_id, state, values)


def check_storage(url: str) -> stores.Store:
    """A storage that can't be used fails here, in one line, before anything is written to it: a scheme cnnexp
    does not know, a folder that can't be written, a damaged SQLite file or one that is not Optuna's."""
    store = stores.parse(url, "sweep.storage")
    if store.file is not None:
        stores.check_writable(store.file.parent, "sweep.storage")
        stores.check_sqlite(store, "sweep.storage", stores.OPTUNA)
    return store


def make_storage(url: str, settings=None, stale_callback=None, read_only: bool = False) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL: RDB (SQLite, PostgreSQL, ...) with heartbeats, or a journal file.

    Heartbeats let any worker fail a trial whose worker died; `stale_callback` then closes its
    MLflow run and, with `sweep.retry_failed`, queues it again to resume from its checkpoint.
    `read_only` (the report, the dashboard): nothing is created, migrated or written, and a SQLite
    file is opened read-only by SQLite itself.
    """
    store = stores.parse(url, "sweep.storage") if read_only else check_storage(url)
    get = (lambda key, default: settings.get(key, default)) if settings is not None else (lambda k, d: d)
    try:
        if store.scheme.optuna == "journal":
            if read_only and (store.file is None or not store.file.exists()):
                raise StorageError(f"no study storage at {store.name}")
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(store.file)))
        if read_only:
            if store.file is not None and not store.file.exists():
                raise StorageError(f"no study storage at {store.name}")
            return optuna.storages.RDBStorage(store.read_only_url(), skip_table_creation=True,
                                              skip_compatibility_check=True)
        engine_kwargs = ({"connect_args": {"timeout": 120}}  # wait, don't fail, when locked
                         if store.scheme.name == "sqlite" else {"pool_pre_ping": True})
        return LostWorkerStorage(url, engine_kwargs=engine_kwargs,
                                 heartbeat_interval=int(get("heartbeat_interval", 10)),
                                 grace_period=int(get("grace_period", 60)),
                                 heartbeat_stale_trial_callback=stale_callback)
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's and the driver's errors: a full disk, a refused login
        cause = str(getattr(err, "orig", None) or err.__cause__ or err).splitlines()[0][:300]
        raise StorageError(f"sweep.storage={store.name} can't be opened ({type(err).__name__}: {cause}).") from err


def make_sampler(settings, space: dict) -> optuna.samplers.BaseSampler:
    options = OmegaConf.to_container(settings.sampler, resolve=True)
    name = options.pop("name", "tpe")
    if name not in SAMPLERS:
        raise ConfigError(f"sweep.sampler.name={name!r} is unknown; use one of {', '.join(SAMPLERS)}.")
    if name == "grid":
        options["search_space"] = grid_of(space)
    if settings.get("constraints"):
        if name not in ("tpe", "nsga2", "gp"):
            raise ConfigError(f"sweep.constraints need a sampler that takes them (tpe, nsga2, gp), not {name}.")
        options["constraints_func"] = Constraints([constraint(c) for c in settings.constraints])
    if name == "gp":
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise ConfigError("sweep.sampler.name=gp needs PyTorch: pip install -e '.[gp]'.") from err
    try:
        return getattr(optuna.samplers, SAMPLERS[name])(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sweep.sampler: {err}") from err


class Constraints:
    """Optuna's constraints_func: each `cost <= limit` as cost - limit (<= 0: feasible), from the trial's record."""

    def __init__(self, limits: list[tuple[str, float]]):
        self.limits = limits

    def __call__(self, frozen: optuna.trial.FrozenTrial) -> list[float]:
        facts = record.read_trial(frozen)
        return [float(facts.cost(name)) - limit if facts.cost(name) is not None else float("inf")
                for name, limit in self.limits]


def make_pruner(settings) -> optuna.pruners.BasePruner:
    options = OmegaConf.to_container(settings.pruner, resolve=True)
    name = options.pop("name", "none")
    if name not in PRUNERS:
        raise ConfigError(f"sweep.pruner.name={name!r} is unknown; use one of {', '.join(PRUNERS)}.")
    try:
        return getattr(optuna.pruners, PRUNERS[name])(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sweep.pruner: {err}") from err


def same_study(study: optuna.Study, expressions: dict, design: Design | None, regime: dict | None, url: str) -> None:
    """A study of this name that searched another space, ran another design or measured another regime (metric,
    direction, epochs, an override that changes what a trial measures) is refused before any trial: its report
    would mix them."""
    facts = record.read_study(study)
    stored = facts.space
    if stored is None:  # a study from before the space was stored: its trials' distributions tell
        stored = {}
        for trial in study.get_trials(deepcopy=False):
            stored.update({k: repr(v) for k, v in trial.distributions.items()})
        expressions = {k: repr(distribution(k, v)) for k, v in expressions.items()} if stored else stored
    cells = ("baseline", "vary", "arms")
    if stored != expressions or (facts.design is not None and design is not None
                                 and {k: getattr(facts.design, k) for k in cells}
                                 != {k: getattr(design, k) for k in cells}):
        had = "; ".join(f"{k}: {v}" for k, v in stored.items())
        raise ConfigError(f"The study {study.study_name!r} exists in {url} with another search space "
                          f"({had}). Rerun it with that space, or start a new study: "
                          f"sweep.study_name={study.study_name}-2.")
    if facts.regime is not None and regime is not None and facts.regime != regime:
        keys = sorted({k for k in {*facts.regime, *regime} if k != "overrides" and facts.regime.get(k) != regime.get(k)}
                      | {k for k in {*facts.regime.get("overrides", {}), *regime.get("overrides", {})}
                         if facts.regime.get("overrides", {}).get(k) != regime.get("overrides", {}).get(k)})
        said = "; ".join(f"{k}: {_regime_value(facts.regime, k)} there, {_regime_value(regime, k)} now" for k in keys)
        raise ConfigError(f"The study {study.study_name!r} in {url} measured another regime ({said}); its trials "
                          f"would be reported beside these. Rerun it as it was, or start a new study: "
                          f"sweep.study_name={study.study_name}-2.")


def _regime_value(regime: dict, key: str):
    return regime.get(key, regime.get("overrides", {}).get(key, "unset"))


def open_study(settings, space: dict, expressions: dict | None = None, design: Design | None = None,
               stale_callback=None, metric_names: list[str] | None = None, regime: dict | None = None) -> CappedStudy:
    """Create the study, or load it when it exists (resume), with the configured sampler and pruner.

    Everything is checked before the study is written to: the storage, and that an existing study
    of this name searches the same space.
    """
    url = str(settings.storage)
    store = check_storage(url)
    directions = [direction for _, direction in objectives(settings)]
    # Workers starting at once: one creates the storage's tables (Optuna's migrations race otherwise)
    # and the study, the others find them.
    with store.lock():
        storage = make_storage(url, settings, stale_callback)
        sampler, pruner = make_sampler(settings, space), make_pruner(settings)
        try:
            existing = str(settings.study_name) in optuna.get_all_study_names(storage)
            if existing:
                found = optuna.load_study(study_name=str(settings.study_name), storage=storage)
                if expressions is not None:
                    same_study(found, expressions, design, regime, url)
                had = [d.name.lower() for d in found.directions]
                if had != directions:
                    raise ConfigError(f"The study {settings.study_name!r} has the directions {had}, not {directions}; "
                                      f"start a new study: sweep.study_name={settings.study_name}-2.")
            else:
                optuna.create_study(study_name=str(settings.study_name), storage=storage, directions=directions)
            study = CappedStudy(study_name=str(settings.study_name), storage=storage, sampler=sampler, pruner=pruner,
                                cap=int(settings.n_trials), lock_url=url)
            if not existing and expressions is not None:
                record.write_study(study, space=expressions, **({"design": design} if design is not None else {}))
            if regime is not None and record.read_study(study).regime is None:
                record.write_study(study, regime=regime)
            if metric_names and study.metric_names != metric_names:
                study.set_metric_names(metric_names)  # the dashboard shows val_accuracy, not "Objective 0"
        except (ConfigError, StorageError):
            raise
        except Exception as err:  # noqa: BLE001 - the database refused: full disk, locked, read-only
            cause = str(getattr(err, "orig", None) or err).splitlines()[0][:300]
            raise StorageError(f"sweep.storage={url}: the study {settings.study_name!r} can't be opened "
                               f"({type(err).__name__}: {cause}).") from err
    return study


def load_study(name: str, url: str) -> optuna.Study:
    """An existing study, to read (the report): opened read-only, so nothing is created, a missing study included."""
    storage = make_storage(url, read_only=True)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise ConfigError(f"No study {name!r} in {url}; studies there: {', '.join(names) or 'none'}.")
    return optuna.load_study(study_name=name, storage=storage)


def assign_seed(study: optuna.Study, trial: optuna.Trial, wanted: int, lock_url: str, unique: bool = False) -> int:
    """The seed this trial trains with.

    `wanted` (the base seed, or the searched `train.seed`) is kept unless that configuration
    already used it (`unique`: any trial of the study used it); then the next unused seed is taken.
    Held under the study lock, so two workers that drew the same configuration at once still get
    different seeds. A designed study asks for `unique` seeds: every run is a replicate of its own
    (its initialisation, data order and training subset), so runs are independent and no seed is a
    block shared by some configurations and not others.
    """
    key = config_key(trial.params)
    with stores.lock(lock_url):
        used = {facts.seed for facts in record.read_trials(study) if facts.number != trial.number
                and facts.seed is not None and (unique or config_key(facts.params) == key)}
        seed = wanted
        while seed in used:
            seed += 1
        record.write(trial, seed=seed)
    return seed


def checkpoint_root(settings) -> Path:
    """Per-trial checkpoints: `sweep.checkpoint_dir`/<study>, else beside the storage (shared by its workers)."""
    if settings.get("checkpoint_dir"):
        return Path(os.path.expanduser(str(settings.checkpoint_dir))) / str(settings.study_name)
    path = stores.parse(str(settings.storage)).file
    return (path.parent if path else Path(str(settings.output_dir))) / "checkpoints" / str(settings.study_name)

"""The sweep's loop: an Optuna study run to its end, by as many workers as join it.

The loop is Optuna's own `study.optimize`: it owns heartbeats, stale trials and trial states;
`cnnexp.study.objective` is the trial. This module adds what a sweep needs around it: checks before
the first trial, the plan of a budget, a designed study's cells and rounds, the MLflow parent run,
waiting for other workers, and repeats. The report is not written here: the CLI hands the
finished study to `cnnexp.report` (the last stage).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid
import warnings

import optuna
from omegaconf import OmegaConf

from cnnexp import record, stores
from cnnexp.config import compose_config
from cnnexp.console import say
from cnnexp.errors import StorageError
from cnnexp.run import prepare as load
from cnnexp.stats.settle import cell_key
from cnnexp.study import budget, rounds
from cnnexp.study.objective import STOP_REQUESTED, Interrupted, Objective, StaleTrialCallback, describe
from cnnexp.study.optuna_study import Constraints, StudyFull, checkpoint_root, config_key, count_trials, open_study
from cnnexp.study.settings import constraint, objectives, parse_budget
from cnnexp.study.space import Sweep, trial_overrides
from cnnexp.tracking import runs, store, views

WAITING, RUNNING = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING


class RecycleProcess(Exception):
    """This process ran `sweep.recycle_after` trials: start afresh to give TensorFlow's memory back."""


def preflight(sweep: Sweep) -> None:
    """Find an unwritable report folder now, not after an hour of training; an unwritable checkpoint folder is
    a warning (checkpoints only let a trial resume: the trials go on without)."""
    settings = sweep.settings
    stores.check_writable(stores.check_writable(settings.output_dir, "sweep.output_dir") / str(settings.study_name),
                   "sweep.output_dir")
    try:
        stores.check_writable(checkpoint_root(settings), "sweep.checkpoint_dir")
    except StorageError as err:
        warnings.warn(f"{err} Trials go on without checkpoints: a killed trial restarts from its first epoch.",
                      stacklevel=2)
    if sweep.base.dataset.get("num_classes") is None:  # an image folder: its classes are known once it is listed
        load(sweep.base, validated=True)  # a subset too small for its classes fails now, not in every trial


def on_sigterm(signum, frame):
    STOP_REQUESTED.set()
    raise Interrupted(f"signal {signum}")


def prepare(sweep: Sweep) -> optuna.Study:
    """Everything before the first trial: checks, the study, the plan, the queued cells, the parent run."""
    settings = sweep.settings
    preflight(sweep)
    study = open_study(settings, sweep.space, sweep.expressions,
                       sweep.design.describe() if sweep.design is not None else None,
                       StaleTrialCallback(int(settings.retry_failed)),
                       metric_names=[metric for metric, _ in objectives(settings)])
    apply_plan(sweep, study)
    if sweep.design is not None:
        enqueue_design(study, sweep)
    attach_study_run(sweep, study)
    return study


def optimize(sweep: Sweep, show_progress: bool = True, recycle_after: int | None = None) -> optuna.Study:
    """Run trials until the study is done: `sweep.n_trials` (or a design's rounds), then the repeats.

    Rerunning resumes: finished trials are kept and never re-run; a trial left RUNNING by a
    killed worker is failed by Optuna's heartbeat check and, with `sweep.retry_failed`, resumed
    from its last checkpoint.
    """
    from tqdm import tqdm

    settings = sweep.settings
    study = prepare(sweep)
    objective = Objective(sweep, study, record.read_study(study).mlflow_parent_run_id)
    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    STOP_REQUESTED.clear()
    bar = tqdm(total=int(settings.n_trials), initial=min(count_trials(study.get_trials(deepcopy=False)),
                                                         int(settings.n_trials)),
               desc=str(settings.study_name), unit="trial", dynamic_ncols=True, leave=False,
               disable=not show_progress or not sys.stderr.isatty())  # a log file gets the lines, not the bar
    loop = Loop(sweep, study, objective, bar, recycle_after)
    try:
        loop.run()
    except KeyboardInterrupt:
        say("Interrupted: the running trial is marked FAIL, the study is saved; rerun the same command to resume.")
        runs.Run(record.read_study(study).mlflow_parent_run_id).end("KILLED")
        raise
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if loop.recycle_now() and not loop.done():
        raise RecycleProcess
    return study


class Loop:
    """`study.optimize` until the study is done; a design's next rounds and the repeats in between."""

    def __init__(self, sweep: Sweep, study: optuna.Study, objective: Objective, bar, recycle_after: int | None):
        self.sweep, self.study, self.objective, self.bar = sweep, study, objective, bar
        self.settings, self.recycle_after, self.ran = sweep.settings, recycle_after, []
        self.started = time.monotonic()
        self.plan = budget.Plan(**record.read_study(study).plan) if record.read_study(study).plan else None

    def recycle_now(self) -> bool:
        return bool(self.recycle_after) and len(self.ran) >= self.recycle_after

    def remaining(self) -> float | None:
        return None if not self.settings.timeout else \
            max(1.0, float(self.settings.timeout) - (time.monotonic() - self.started))

    def after_trial(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        self.ran.append(frozen.number)
        facts = record.read_trial(frozen)
        if facts.repeat_of is None and facts.round == 1:
            self.bar.update(1)
        main = self.sweep.design.main if self.sweep.design is not None else None
        best = record.best_trial(study, main)
        self.bar.set_postfix_str(f"best {self.settings.metric}={best.values[0]:.4f} (#{best.number})" if best else "")
        say(trial_line(facts, str(self.settings.metric)))
        if self.recycle_now():
            study.stop()

    def done(self) -> bool:
        """Nothing left to run: nothing queued, the total reached, and (a design) no further round."""
        trials = self.study.get_trials(deepcopy=False)
        return not any(t.state == WAITING for t in trials) and count_trials(trials) >= int(self.settings.n_trials)

    def run(self) -> None:
        waited = False
        while True:
            if self.settings.timeout and self.remaining() <= 1.0:
                say(f"sweep.timeout={self.settings.timeout}s reached; rerun to continue the study.")
                return
            try:
                self.study.optimize(self.objective, timeout=self.remaining(), catch=(Exception,),
                                    callbacks=[self.after_trial], gc_after_trial=False)
            except StudyFull:
                pass
            if STOP_REQUESTED.is_set():
                raise Interrupted("SIGTERM")
            trials = self.study.get_trials(deepcopy=False)
            if self.recycle_now():
                # Queue what comes next before this process restarts, so that the next one finds it.
                if not any(t.state in (WAITING, RUNNING) for t in trials) and count_trials(trials) >= int(
                        self.settings.n_trials):
                    self._more_to_do()
                return
            if any(t.state == WAITING for t in trials):
                continue  # queued cells, repeats, or a lost trial queued again: take them
            if count_trials(trials) < int(self.settings.n_trials) and not self.settings.timeout:
                continue  # a sampler stopped the loop early (a covered grid): fill up to n_trials
            if not any(t.state == RUNNING for t in trials):
                if self._more_to_do():
                    continue
                return
            if not self._wait_for_others(trials, waited):
                return
            waited = True

    def _more_to_do(self) -> bool:
        """Queue what comes after the trials: a design's next round, else the repeats (idempotent)."""
        if self.sweep.design is not None:
            return rounds.advance(self.study, self.sweep, self.plan)
        if int(self.settings.repeats) > 0:
            return enqueue_repeats(self.study, self.settings) > 0
        return False

    def _wait_for_others(self, trials, waited: bool) -> bool:
        if stores.parse(str(self.settings.storage)).scheme.optuna == "journal":  # no heartbeats
            say("Trials still RUNNING in the journal storage (it has no heartbeats, so a killed worker's trial "
                "stays RUNNING): " + ", ".join(str(t.number) for t in trials if t.state == RUNNING) + ". Not waiting.")
            return False
        if not waited:  # other workers' trials still run (or a dead worker's, failed after the grace period)
            say(f"Waiting for trials still running in other workers (a dead worker's trial is failed after "
                f"sweep.grace_period={self.settings.grace_period}s without heartbeat).")
        optuna.storages.fail_stale_trials(self.study)
        time.sleep(min(float(self.settings.heartbeat_interval), 5.0))
        return True


def trial_line(facts: record.TrialRecord, metric: str) -> str:
    """One line when a trial ends: what it was and what it scored (or why it did not)."""
    label = f"repeat of trial {facts.repeat_of}" if facts.repeat_of is not None else f"trial {facts.number}"
    what = describe(facts.params) + (f" seed {facts.seed}" if facts.seed is not None else "")
    if facts.complete:
        text = (f"{label} ({what}): {metric}={facts.value:.4f} test_accuracy="
                f"{facts.test_accuracy if facts.test_accuracy is not None else float('nan'):.4f} "
                f"in {facts.duration_s or 0:.0f}s")
        return text + (f" [flagged: {facts.flag}]" if facts.flag else "")
    reason = facts.pruned or facts.error or ""
    return f"{label} ({what}): {facts.state}" + (f" — {reason}" if reason else "")


def enqueue_repeats(study: optuna.Study, settings) -> int:
    """Queue `repeats` more seeds of the best `repeat_top` configurations (idempotent across reruns).

    Repeats live in the main study, marked `repeat_of`: each gets the next unused seed of its
    configuration (a genuine replicate), they don't count towards `n_trials`, and are never pruned.
    """
    with stores.lock(str(settings.storage)):
        records = record.read_trials(study)
        main = [r for r in records if r.complete and r.repeat_of is None]
        top = sorted(main, key=lambda r: r.value, reverse=settings.direction == "maximize")[: int(settings.repeat_top)]
        queued = 0
        for source in top:
            have = sum(r.repeat_of == source.number and r.state != "FAIL" for r in records)
            for _ in range(int(settings.repeats) - have):
                record.enqueue(study, source.params, repeat_of=source.number)
                queued += 1
    return queued


def _planned_cells(sweep: Sweep) -> list[budget.Planned]:
    """What the first round trains, per configuration (a design's cells; else n_trials of the base config)."""
    if sweep.design is None:
        return [budget.Planned("base", list(sweep.overrides), int(sweep.settings.n_trials), int(sweep.base.train.epochs))]
    cells = []
    for cell, count in sweep.design.first_round():
        overrides = trial_overrides(sweep, cell)
        cfg = compose_config(overrides)
        own_data = cell.get("task") != sweep.design.main and any(o.startswith("dataset") for o in
                                                                 sweep.design.arms.get(cell["task"], []))
        images = None
        if own_data:
            from cnnexp.run import prepare as load

            images = len(load(cfg, validated=True)[1].y_train)
        cells.append(budget.Planned(cell_key(cell), overrides, count, int(cfg.train.epochs), images))
    return cells


def apply_plan(sweep: Sweep, study: optuna.Study) -> None:
    """With `sweep.budget`: plan the training-set size once per study, print it, and use it.

    The plan is stored on the study, so that every worker and every resumed run trains on the
    same data as the first; a study without a budget trains what it was told to.
    """
    settings = sweep.settings
    seconds = parse_budget(settings.get("budget"))
    stored = record.read_study(study).plan
    if stored is None and seconds is None:
        return
    if stored is None:
        with stores.lock(str(settings.storage)):
            stored = record.read_study(study).plan
            if stored is None:
                say(f"Timing each configuration for sweep.budget={settings.budget} ...")
                from cnnexp.run import DatasetMemo
                from cnnexp.run import prepare as load

                _, data = load(sweep.base, validated=True)
                full = len(data.y_train) + len(data.y_val) * (not data.shared_eval)
                cap = int(sweep.base.dataset.train_limit) if sweep.base.dataset.get("train_limit") else full
                share = 0.55 if sweep.design is not None and int(sweep.answers.looks) > 1 else 1.0
                made = budget.plan(_planned_cells(sweep), seconds, min(full, cap), share, DatasetMemo())
                stored = made.__dict__
                record.write_study(study, plan=stored)
    plan = budget.Plan(**stored)
    say(plan.text())
    # The main task's data: an arm that names its own dataset keeps it (space.trial_overrides).
    sweep.overrides.append(f"dataset.train_limit={plan.train_limit}")


def enqueue_design(study: optuna.Study, sweep: Sweep) -> int:
    """Queue every cell of a designed study's first round, minus what the study already holds."""
    with stores.lock(str(sweep.settings.storage)):
        records = [r for r in record.read_trials(study) if r.round == 1 and r.repeat_of is None]
        queued = 0
        for cell, count in sweep.design.first_round():
            key = config_key(cell)
            mine = [r for r in records if config_key(r.params) == key]
            have = sum(1 for r in mine if r.state != "FAIL")
            # A failed cell is queued again on the next run, but not forever: at most twice its seeds.
            for _ in range(min(count - have, 2 * count - len(mine))):
                record.enqueue(study, cell)
                queued += 1
    return queued


def attach_study_run(sweep: Sweep, study: optuna.Study) -> runs.Run:
    """Find or create the study's MLflow parent run, once for all workers, and record it in the study."""
    settings = sweep.settings
    params = {"study_name": settings.study_name, "direction": settings.direction, "metric": settings.metric,
              "n_trials": settings.n_trials, "storage": settings.storage,
              "sampler": OmegaConf.to_container(settings.sampler), "pruner": OmegaConf.to_container(settings.pruner),
              "overrides": " ".join(sweep.overrides), **{f"space.{k}": v for k, v in sweep.expressions.items()}}
    with stores.lock(str(settings.storage)):
        facts = record.read_study(study)
        if facts.uuid is None:
            record.write_study(study, uuid=uuid.uuid4().hex)
        parent = runs.study_run(sweep.base.tracking, str(settings.study_name), params, facts.mlflow_parent_run_id,
                                record.read_study(study).uuid)
        if parent.run_id:
            record.write_study(study, mlflow_parent_run_id=parent.run_id,
                               mlflow_tracking_uri=store.use(sweep.base.tracking.uri))
            url = views.share_study_view(parent, str(settings.study_name), list(sweep.space), str(settings.metric),
                                         str(settings.direction))
            if url:  # the page that opens this study's runs, for the report and the terminal
                record.write_study(study, mlflow_ui_url=url)
        record.write_study(study, metric=str(settings.metric), answers=OmegaConf.to_container(sweep.answers),
                           objectives=[metric for metric, _ in objectives(settings)],
                           constraints=[list(constraint(c)) for c in settings.get("constraints") or []])
    return parent


def end_parent(study: optuna.Study, status: str | None = None) -> bool:
    """End the study's MLflow parent run (FINISHED when a trial completed, else FAILED); True: a trial completed."""
    complete = any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    facts = record.read_study(study)
    if facts.mlflow_parent_run_id and facts.mlflow_tracking_uri:
        store.use(facts.mlflow_tracking_uri)
        runs.Run(facts.mlflow_parent_run_id).end(status or ("FINISHED" if complete else "FAILED"))
    return complete


def front(study: optuna.Study, settings) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front of a multi-objective study, of the trials that meet `sweep.constraints`."""
    feasible = Constraints([constraint(c) for c in settings.get("constraints") or []])
    return [t for t in study.best_trials if all(v <= 0 for v in feasible(t))]


def register_champion(sweep: Sweep, study: optuna.Study) -> int | None:
    """A multi-objective study's champion: the most accurate model on the front that meets the constraints,
    registered as `cnnexp-<study>@champion` (each trial logged its model). Returns its trial number."""
    candidates = front(study, sweep.settings)
    if not candidates:
        return None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    champion = (max if maximize else min)(candidates, key=lambda t: t.values[0])
    facts, where = record.read_trial(champion), record.read_study(study)
    if facts.mlflow_run_id and where.mlflow_tracking_uri and where.champion is None:
        store.use(where.mlflow_tracking_uri)
        run = runs.Run(facts.mlflow_run_id)
        uri = run.logged_model_uri()
        version = run.register(uri, f"cnnexp-{sweep.settings.study_name}") if uri else None
        if version:
            record.write_study(study, champion={"trial": champion.number, "registered_version": version})
    say(f"Champion: trial {champion.number} ({describe(champion.params)}), {sweep.settings.metric}="
        f"{champion.values[0]:.4f}, the most accurate on the front of {len(candidates)} that meet the constraints.")
    return champion.number

"""The sweep's loop: an Optuna study run to its end, by as many workers as join it.

The loop is Optuna's own `study.optimize`: it owns heartbeats, stale trials and trial states;
`cnnexp.study.objective` is the trial. This module adds what a sweep needs around it: checks before
the first trial, the plan of a budget (`budget`), a designed study's cells and rounds (`rounds`),
the MLflow parent run (`parent`), waiting for other workers, and repeats. The report is not written
here: the CLI hands the finished study to `cnnexp.reporting` (the last stage).
"""

from __future__ import annotations

import sys
import time
import warnings

import optuna

from cnnexp import record, stop, stores
from cnnexp.console import say
from cnnexp.design import short_label
from cnnexp.errors import ConfigError, StorageError
from cnnexp.run import prepare as load
from cnnexp.study import budget, parent, rounds
from cnnexp.study.objective import Objective, StaleTrialCallback
from cnnexp.study.optuna_study import StudyFull, checkpoint_root, count_trials, open_study
from cnnexp.study.settings import objectives
from cnnexp.study.space import Sweep

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


def prepare(sweep: Sweep) -> optuna.Study:
    """Everything before the first trial: checks, the study, the plan, the queued cells, the parent run."""
    settings = sweep.settings
    preflight(sweep)
    began = time.time()
    study = open_study(settings, sweep.space, sweep.expressions, sweep.design,
                       StaleTrialCallback(int(settings.retry_failed), parent.tracking_uri(sweep)),
                       metric_names=[metric for metric, _ in objectives(settings)], regime=sweep.regime())
    if record.read_study(study).started_at is None:
        record.write_study(study, started_at=began)
    budget.apply_plan(sweep, study)
    if sweep.design is not None:
        rounds.enqueue_design(study, sweep)
    parent.attach(sweep, study, reopen=not finished(study, sweep))
    return study


def finished(study: optuna.Study, sweep: Sweep) -> bool:
    """Nothing left to run or to queue: no trial waiting or running, the total reached, a design's last look taken
    (and its confirmations done), the repeats queued."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state in (WAITING, RUNNING) for t in trials) or count_trials(trials) < int(sweep.settings.n_trials):
        return False
    if sweep.design is not None:
        looks = record.read_study(study).rounds
        return bool(looks) and looks[-1].final and not rounds.confirmations_pending(study)
    if int(sweep.settings.repeats) > 0:
        return rounds.enqueue_repeats(study, sweep.settings, dry_run=True) == 0
    return True


def optimize(sweep: Sweep, show_progress: bool = True, recycle_after: int | None = None) -> optuna.Study:
    """Run trials until the study is done: `sweep.n_trials` (or a design's rounds), then the repeats.

    Rerunning resumes: finished trials are kept and never re-run; a trial left RUNNING by a
    killed worker is failed by Optuna's heartbeat check and, with `sweep.retry_failed`, resumed
    from its last checkpoint. A stop signal (SIGTERM, SIGHUP, Ctrl-C) marks the running trial FAIL
    and queues it again, ends the parent run KILLED and raises `stop.Interrupted`.
    """
    from tqdm import tqdm

    settings = sweep.settings
    with stop.on_signals():
        study = prepare(sweep)
        objective = Objective(sweep, study, record.read_study(study).mlflow_parent_run_id)
        bar = tqdm(total=int(settings.n_trials), initial=min(count_trials(study.get_trials(deepcopy=False)),
                                                             int(settings.n_trials)),
                   desc=str(settings.study_name), unit="trial", dynamic_ncols=True, leave=False,
                   disable=not show_progress or not sys.stderr.isatty())  # a log file gets the lines, not the bar
        loop = Loop(sweep, study, objective, bar, recycle_after)
        try:
            loop.run()
        except KeyboardInterrupt:
            with stop.ignoring_signals():  # the lines that end the runs must not be cut by a second signal
                say("Interrupted: the running trial is marked FAIL, the study is saved; rerun the same command to "
                    "resume.")
                parent.end(study, parent.tracking_uri(sweep), "KILLED")
            raise
        finally:
            bar.close()
    if loop.recycle_now() and not finished(study, sweep):
        raise RecycleProcess
    return study


class Loop:
    """`study.optimize` until the study is done; a design's next rounds and the repeats in between."""

    def __init__(self, sweep: Sweep, study: optuna.Study, objective: Objective, bar, recycle_after: int | None):
        self.sweep, self.study, self.objective, self.bar = sweep, study, objective, bar
        self.settings, self.recycle_after, self.ran = sweep.settings, recycle_after, []
        self.started = time.monotonic()
        self.plan = record.read_study(study).plan
        objective.on_trial_done = self.after_trial  # the trials it trains beside its own (towers)

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
        if self.recycle_now() or self.objective.unprepared:
            study.stop()

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
            stop.check()
            if self.objective.unprepared:  # a trial that can't even be set up would fail every time
                raise ConfigError(f"{self.objective.unprepared}; fix it and rerun the same command to resume.")
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
        """Queue what comes after the trials: a design's next round or confirmations, else the repeats."""
        if self.sweep.design is not None:
            return rounds.advance(self.study, self.sweep, self.plan)
        if int(self.settings.repeats) > 0:
            return rounds.enqueue_repeats(self.study, self.settings) > 0
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
    what = short_label(facts.params) + (f" seed {facts.seed}" if facts.seed is not None else "")
    if facts.confirms:
        what += f" at {facts.train_limit:,} images"
    if facts.complete:
        text = (f"{label} ({what}): {metric}={facts.value:.4f} test_accuracy="
                f"{facts.test_accuracy if facts.test_accuracy is not None else float('nan'):.4f} "
                f"in {facts.duration_s or 0:.0f}s")
        return text + (f" [flagged: {facts.flag}]" if facts.flag else "")
    reason = facts.pruned or facts.error or ""
    return f"{label} ({what}): {facts.state}" + (f" — {reason}" if reason else "")

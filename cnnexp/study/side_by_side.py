"""Seeds side by side (`design.replicates_per_model`): the waiting trials of one cell trained as one model.

The objective's trial claims the next waiting trials of its cell (other seeds) as `study.ask` claims one,
trains them as one Keras model of independent towers (`cnnexp.run.run_side_by_side`), records each trial
and its MLflow run as a trial of its own, and tells Optuna how each claimed trial ended, as
`study.optimize` does for its own. Functions over the `Objective` (cnnexp.study.objective), which calls
them: its preparation, recording and failure handling stay the one home of those.
"""

from __future__ import annotations

import contextlib
import functools

import optuna

from cnnexp import record, runtime, stop
from cnnexp.console import say
from cnnexp.design import config_key
from cnnexp.errors import NonFiniteLossError
from cnnexp.run import run_side_by_side
from cnnexp.study.settings import objectives


def towers(objective, attempt) -> int:
    """How many seeds of this trial's cell may train with it as one model: 1 where a tower can't be one run.

    Towers validate once, at the end, keep no checkpoint and run on TensorFlow's tf.data: a curve, early
    stopping, a resumed checkpoint, an endless stream or another backend train one model at a time."""
    cfg, design = attempt.cfg, objective.design
    if design is None or objective.multi or attempt.curve or attempt.keep_correct or attempt.retry_of is not None:
        return 1
    if (cfg.train.early_stopping.enabled or cfg.train.get("images_per_epoch")
            or str(cfg.train.pipeline) != "tf_data" or runtime.keras().backend.backend() != "tensorflow"):
        return 1
    return int(design.replicates_per_model)


def cell_of(frozen) -> tuple:
    """A waiting trial's cell as it was queued (its training-set size is checked once it is prepared)."""
    return config_key(record.fixed_params(frozen) or {}), record.read_trial(frozen).confirms


def companions(objective, trial: optuna.Trial, attempt, heartbeats: contextlib.ExitStack) -> list[tuple]:
    """This trial, and the next waiting trials of its cell (other seeds), claimed as `study.ask` claims one.

    Each claimed trial beats from the moment it is RUNNING: a lost worker's companions are failed by their
    heartbeat, and retried, like its own trial."""
    from optuna.storages._heartbeat import get_heartbeat_thread  # what `study.optimize` gives its own trial

    study = objective.study
    group, cell = [(trial, attempt)], cell_of(study.get_trials(deepcopy=False)[trial.number])
    while len(group) < towers(objective, attempt):
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if not waiting or cell_of(waiting[0]) != cell:
            break
        # Claimed as `study.ask` claims a waiting trial (WAITING -> RUNNING, atomic in the storage), but this
        # one only: when another worker took it first, the group is what it is (never a new, sampled trial).
        try:
            if not study._storage.set_trial_state_values(waiting[0]._trial_id, state=optuna.trial.TrialState.RUNNING):
                break
        except optuna.exceptions.UpdateFinishedTrialError:
            break
        heartbeats.enter_context(get_heartbeat_thread(waiting[0]._trial_id, study._storage))
        other = optuna.Trial(study, waiting[0]._trial_id)
        try:
            other_attempt = objective._prepare(other)
        except BaseException as err:
            objective._unprepared(other, err)
            study.tell(other, state=optuna.trial.TrialState.FAIL)
            raise
        if towers(objective, other_attempt) <= 1 or \
                other_attempt.cfg.dataset.get("train_limit") != attempt.cfg.dataset.get("train_limit"):
            finish(objective, other, functools.partial(objective._single, other, other_attempt))  # trains alone
            break
        group.append((other, other_attempt))
    return group


def train(objective, group: list[tuple]):
    """Train the group's seeds as one model of towers; record each trial; tell the companions; return the
    first trial's value (`study.optimize` tells it)."""
    trials, attempts = [t for t, _ in group], [a for _, a in group]
    children = [objective._child_run(t, a) for t, a in group]
    say(f"  trials {', '.join(str(t.number) for t in trials)}: {len(group)} seeds side by side, one model")
    try:
        with children[0].system_metrics(bool(objective.settings.system_metrics)), stop.deferred():
            results = run_side_by_side([a.cfg for a in attempts], [a.overrides for a in attempts],
                                       [c.run_id for c in children], [a.name for a in attempts],
                                       objective.parent_run_id, objective.datasets, objective.models)
    except NonFiniteLossError as err:  # one seed diverged: each trains alone, and only that one fails
        say(f"  {err}; the {len(group)} seeds train one by one")
        return each(objective, group, [lambda t=t, a=a, c=c: objective._single(t, a, c)
                                       for (t, a), c in zip(group, children)])
    except BaseException as err:
        for (t, a), child in zip(group, children):
            objective._failed(t, child, objective.checkpoints / a.key, err)
        for other in trials[1:]:
            objective.study.tell(other, state=optuna.trial.TrialState.FAIL)
        raise

    def keep(t, a, result, child):
        try:
            value = objective._value(result, objectives(objective.settings)[0][0])
            objective._record(t, result, child, value)
            record.write(t, towers=len(group))
            return value
        except BaseException as err:
            objective._failed(t, child, objective.checkpoints / a.key, err)
            raise

    return each(objective, group, [lambda t=t, a=a, r=r, c=c: keep(t, a, r, c)
                                   for (t, a), r, c in zip(group, results, children)])


def each(objective, group, steps):
    """Run each trial's step: the companions are told here, the first trial's value is returned (or raised)."""
    for (trial, _), step in zip(group[1:], steps[1:]):
        finish(objective, trial, step)
    return steps[0]()


def finish(objective, trial: optuna.Trial, step) -> None:
    """Tell Optuna how a claimed trial (`study.ask`) ended, as `study.optimize` does for its own."""
    study = objective.study
    try:
        value = step()
    except KeyboardInterrupt:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    except Exception:  # noqa: BLE001 - recorded on the trial by `_failed`; a failing trial never stops the sweep
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)
    if objective.on_trial_done is not None:
        objective.on_trial_done(study, study.get_trials(deepcopy=False)[trial.number])

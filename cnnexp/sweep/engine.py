"""Sweep stage: an Optuna study over a search space written in Hydra's sweep grammar.

    python -m cnnexp.sweep --sweep kernel_size
    python -m cnnexp.sweep --sweep quick 'kernel=choice(2,3,4,5,6,7)' sweep.n_trials=6 train.epochs=1

The loop is Optuna's own `study.optimize`: it owns heartbeats, stale trials and trial states;
`cnnexp.objective` is the trial. This module adds what a sweep needs around it: checks before
the first trial, the MLflow parent run, waiting for other workers, repeats, and the CLI.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from cnnexp.console import say
from cnnexp.errors import ConfigError, StorageError
from cnnexp.locks import store_lock
from cnnexp.sweep.objective import STOP_REQUESTED, Interrupted, Objective, describe
from cnnexp.sweep.space import Sweep
from cnnexp.sweep.study import StudyFull, best_trial, checkpoint_root, count_trials, open_study
from cnnexp.tracking import runs, views


class RecycleProcess(Exception):
    """This process ran `sweep.recycle_after` trials: start afresh to give TensorFlow's memory back."""


METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")


def preflight(sweep: Sweep) -> None:
    """Find an unwritable output, storage or checkpoint folder, or an unknown metric, now, not after an hour."""
    settings = sweep.settings
    if str(settings.metric) not in METRICS:
        raise ConfigError(f"sweep.metric={settings.metric!r} is not a metric a trial reports; use one of "
                          f"{', '.join(METRICS)}.")
    for key, folder in (("sweep.output_dir", Path(str(settings.output_dir)) / str(settings.study_name)),
                        ("sweep.checkpoint_dir", checkpoint_root(settings))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise StorageError(f"{key}: can't write to {folder} ({err.strerror}); point {key} at a writable "
                               "folder.") from err


def _on_sigterm(signum, frame):
    STOP_REQUESTED.set()
    raise Interrupted(f"signal {signum}")


def optimize(sweep: Sweep, show_progress: bool = True, recycle_after: int | None = None) -> optuna.Study:
    """Run trials until the study holds `sweep.n_trials` trials (all states), then the repeats.

    Rerunning resumes: finished trials are kept and never re-run; a trial left RUNNING by a
    killed worker is failed by Optuna's heartbeat check and, with `sweep.retry_failed`, resumed
    from its last checkpoint.
    """
    from tqdm import tqdm

    settings = sweep.settings
    preflight(sweep)
    study = open_study(settings, sweep.space, metric_names=[str(settings.metric)])
    apply_plan(sweep, study)
    if sweep.design is not None:
        enqueue_design(study, sweep)
    parent = attach_study_run(sweep, study)
    objective = Objective(sweep, study, parent.run_id)
    total, started = int(settings.n_trials), time.monotonic()
    previous = (signal.signal(signal.SIGTERM, _on_sigterm)
                if threading.current_thread() is threading.main_thread() else None)
    STOP_REQUESTED.clear()
    bar = tqdm(total=total, initial=min(count_trials(study.get_trials(deepcopy=False)), total),
               desc=str(settings.study_name), unit="trial", dynamic_ncols=True,
               disable=not show_progress or not sys.stderr.isatty(),  # a log file gets the lines, not the bar
               leave=False)
    ran = []

    def after_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        ran.append(frozen.number)
        if "repeat_of" not in frozen.user_attrs:
            bar.update(1)
        best = best_trial(study)
        bar.set_postfix_str(f"best {settings.metric}={best.value:.4f} (#{best.number})" if best else "")
        say(trial_line(frozen, str(settings.metric)))
        if recycle_after and len(ran) >= recycle_after:
            study.stop()

    def remaining():
        return None if not settings.timeout else max(1.0, float(settings.timeout) - (time.monotonic() - started))

    try:
        _run_until_done(study, objective, after_trial, remaining, settings, ran, recycle_after)
        main_running = any(t.state == optuna.trial.TrialState.RUNNING and "repeat_of" not in t.user_attrs
                           for t in study.get_trials(deepcopy=False))
        if int(settings.repeats) > 0 and _done(study, total) and not main_running:
            enqueue_repeats(study, settings)  # idempotent: queues only the repeats still missing
        if not (recycle_after and len(ran) >= recycle_after) and not _done(study, total):
            _run_until_done(study, objective, after_trial, remaining, settings, ran, None)
    except KeyboardInterrupt:
        say("Interrupted: the running trial is marked FAIL, the study is saved; rerun the same command to resume.")
        parent.end("KILLED")
        raise
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if recycle_after and len(ran) >= recycle_after and not _done(study, total):
        raise RecycleProcess
    return study


def _run_until_done(study, objective, after_trial, remaining, settings, ran, recycle_after) -> None:
    """`study.optimize` until the storage says the study is full, then wait for other workers' trials."""
    waited = False
    while True:
        if settings.timeout and remaining() <= 1.0:
            say(f"sweep.timeout={settings.timeout}s reached; rerun to continue the study.")
            return
        try:
            study.optimize(objective, timeout=remaining(), catch=(Exception,), callbacks=[after_trial],
                           gc_after_trial=False)
        except StudyFull:
            pass
        if STOP_REQUESTED.is_set():
            raise Interrupted("SIGTERM")
        if recycle_after and len(ran) >= recycle_after:
            return
        trials = study.get_trials(deepcopy=False)
        if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
            continue  # enqueued repeats, or a lost trial queued again: take it
        if count_trials(trials) < int(settings.n_trials) and not settings.timeout:
            continue  # a sampler stopped the loop early (a covered grid): fill up to n_trials
        if not any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
            return
        if str(settings.storage).startswith("journal"):
            say("Trials still RUNNING in the journal storage (it has no heartbeats, so a killed worker's trial "
                "stays RUNNING): " + ", ".join(str(t.number) for t in trials
                                                if t.state == optuna.trial.TrialState.RUNNING) + ". Not waiting.")
            return
        if not waited:  # other workers' trials still run (or a dead worker's, failed after the grace period)
            say(f"Waiting for trials still running in other workers (a dead worker's trial is failed after "
                f"sweep.grace_period={settings.grace_period}s without heartbeat).")
            waited = True
        optuna.storages.fail_stale_trials(study)
        time.sleep(min(float(settings.heartbeat_interval), 5.0))


def _done(study: optuna.Study, total: int) -> bool:
    """Nothing left to run here: no queued trial (a design's cells, repeats, retries) and the total reached."""
    trials = study.get_trials(deepcopy=False)
    return not any(t.state == optuna.trial.TrialState.WAITING for t in trials) and count_trials(trials) >= total


def trial_line(frozen: optuna.trial.FrozenTrial, metric: str) -> str:
    """One line when a trial ends: what it was and what it scored (or why it did not)."""
    attrs = frozen.user_attrs
    what = describe(frozen.params)
    label = f"repeat of trial {attrs['repeat_of']}" if "repeat_of" in attrs else f"trial {frozen.number}"
    seed = f" seed {attrs['seed']}" if "seed" in attrs else ""
    if frozen.state == optuna.trial.TrialState.COMPLETE:
        text = (f"{label} ({what}{seed}): {metric}={frozen.value:.4f} test_accuracy="
                f"{attrs.get('test_accuracy', float('nan')):.4f} in {attrs.get('train_seconds', 0):.0f}s")
        return text + (f" [flagged: {attrs['flag']}]" if "flag" in attrs else "")
    reason = attrs.get("pruned") or attrs.get("error") or ""
    return f"{label} ({what}{seed}): {frozen.state.name}" + (f" — {reason}" if reason else "")


def enqueue_repeats(study: optuna.Study, settings) -> int:
    """Queue `repeats` more seeds of the best `repeat_top` configurations (idempotent across reruns).

    Repeats live in the main study, marked `repeat_of`: each gets the next unused seed of its
    configuration (a genuine replicate), they don't count towards `n_trials`, and are never pruned.
    """
    with store_lock(str(settings.storage)):
        trials = study.get_trials(deepcopy=False)
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        main = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "repeat_of" not in t.user_attrs]
        top = sorted(main, key=lambda t: t.value, reverse=maximize)[: int(settings.repeat_top)]
        queued = 0
        for source in top:
            have = sum(t.user_attrs.get("repeat_of") == source.number and t.state != optuna.trial.TrialState.FAIL
                       for t in trials)
            for _ in range(int(settings.repeats) - have):
                study.enqueue_trial(source.params, user_attrs={"repeat_of": source.number})
                queued += 1
    return queued


def apply_plan(sweep: Sweep, study: optuna.Study) -> None:
    """With `sweep.budget`: choose the training-set size once per study, print it, and use it.

    The plan is stored on the study, so that every worker and every resumed run trains on the
    same data as the first; a study without a budget trains what it was told to.
    """
    from cnnexp.sweep import budget

    settings = sweep.settings
    seconds = budget.parse_budget(settings.get("budget"))
    stored = study.user_attrs.get("plan")
    if stored is None and seconds is None:
        return
    if stored is None:
        with store_lock(str(settings.storage)):
            stored = study.user_attrs.get("plan")
            if stored is None:
                say(f"Timing one training step of each configuration for sweep.budget={settings.budget} ...")
                stored = asdict(_make_plan(sweep, seconds))
                study.set_user_attr("plan", stored)
    plan = budget.Plan(**stored)
    say(plan.text())
    # The main task's data: an arm that names its own dataset keeps it (space.trial_overrides).
    sweep.overrides.append(f"dataset.train_limit={plan.train_limit}")


def _make_plan(sweep: Sweep, seconds: float):
    from cnnexp.run import prepare
    from cnnexp.sweep import budget
    from cnnexp.sweep.space import trial_overrides

    base = sweep.base
    full = int(base.dataset.train_limit) if base.dataset.get("train_limit") else None
    if full is None:
        _, data = prepare(base, validated=True)
        full = len(data.y_train) + len(data.y_val)
    epochs = int(base.train.epochs)
    if sweep.design is None:
        runs, main = [list(sweep.overrides)] * int(sweep.settings.n_trials), [True] * int(sweep.settings.n_trials)
        fixed = {}
    else:
        runs, main, fixed = [], [], {}
        for cell in sweep.design.cells():
            arm = cell.get("task") in sweep.design.arms
            overrides = trial_overrides(sweep, cell)
            if arm:
                from cnnexp.config import compose_config

                _, data = prepare(compose_config(overrides), validated=True)
            for _ in range(sweep.design.seeds):
                if arm:
                    fixed[len(runs)] = len(data.y_train)
                runs.append(overrides)
                main.append(not arm)
    return budget.plan(runs, main, seconds, full, epochs, fixed, base.train.get("images_per_epoch"))


def enqueue_design(study: optuna.Study, sweep: Sweep) -> int:
    """Queue every cell of a designed study `seeds` times, minus what the study already holds."""
    from cnnexp.sweep.study import config_key

    with store_lock(str(sweep.settings.storage)):
        study.set_user_attr("design", {"main": sweep.design.main, "baseline": sweep.design.baseline,
                                       "arms": list(sweep.design.arms), "seeds": sweep.design.seeds})
        trials = study.get_trials(deepcopy=False)
        queued = 0
        for cell in sweep.design.cells():
            key = config_key(cell)
            runs = [t for t in trials if config_key(_fixed_or_params(t)) == key and "repeat_of" not in t.user_attrs]
            have = sum(1 for t in runs if t.state != optuna.trial.TrialState.FAIL)
            # A failed cell is queued again on the next run, but not forever: at most twice its seeds.
            for _ in range(min(sweep.design.seeds - have, 2 * sweep.design.seeds - len(runs))):
                study.enqueue_trial(cell)
                queued += 1
    return queued


def _fixed_or_params(trial: optuna.trial.FrozenTrial) -> dict:
    return trial.params or trial.system_attrs.get("fixed_params", {})


def attach_study_run(sweep: Sweep, study: optuna.Study) -> runs.Run:
    """Find or create the study's MLflow parent run, once for all workers, and record it in the study."""
    settings = sweep.settings
    params = {"study_name": settings.study_name, "direction": settings.direction, "metric": settings.metric,
              "n_trials": settings.n_trials, "storage": settings.storage,
              "sampler": OmegaConf.to_container(settings.sampler), "pruner": OmegaConf.to_container(settings.pruner),
              "overrides": " ".join(sweep.overrides),
              **{f"space.{k}": v for k, v in sweep.expressions.items()}}
    with store_lock(str(settings.storage)):
        if "uuid" not in study.user_attrs:
            study.set_user_attr("uuid", uuid.uuid4().hex)
        parent = runs.study_run(sweep.base.tracking, str(settings.study_name), params,
                                    study.user_attrs.get("mlflow_parent_run_id"), study.user_attrs["uuid"])
        if parent.run_id:
            import mlflow

            study.set_user_attr("mlflow_parent_run_id", parent.run_id)
            study.set_user_attr("mlflow_tracking_uri", mlflow.get_tracking_uri())
            url = views.share_study_view(parent, str(settings.study_name), list(sweep.space), str(settings.metric),
                                            str(settings.direction))
            if url:  # the page that opens this study's runs, for the report and the terminal
                study.set_user_attr("mlflow_ui_url", url)
        study.set_user_attr("metric", str(settings.metric))
    return parent


def finish(sweep: Sweep, study: optuna.Study, report: bool = True) -> int:
    """Write the report, attach it to the parent run, end the parent run, and return the exit code."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    parent = runs.Run(study.user_attrs.get("mlflow_parent_run_id"))
    if parent.run_id and study.user_attrs.get("mlflow_tracking_uri"):
        import mlflow

        mlflow.set_tracking_uri(study.user_attrs["mlflow_tracking_uri"])
    code = 0 if complete else 1
    try:
        if report:
            from cnnexp.report.write import write_report

            summary = write_report(study, sweep.settings, parent=parent)
            say(summary)
    except Exception as err:  # noqa: BLE001 - the study is saved; the report can be rerun on its own
        print(f"error: the report could not be written ({type(err).__name__}: {err}); the study is saved, "
              f"rerun it with: python -m cnnexp.report {sweep.settings.study_name} "
              f"--storage {sweep.settings.storage} --out {sweep.settings.output_dir}", file=sys.stderr)
        code = 2
    finally:
        parent.end("FINISHED" if complete else "FAILED")  # never left RUNNING, whatever the report did
    if not complete:
        print(f"error: no trial of study {sweep.settings.study_name!r} completed; see the trials' 'error' attributes.",
              file=sys.stderr)
    return code

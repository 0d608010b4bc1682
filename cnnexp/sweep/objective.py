"""One trial: the Optuna objective that `study.optimize` calls.

A trial is exactly `python -m cnnexp.run <fixed overrides> <trial overrides>`, run in this
process, logged as an MLflow child run that this module creates and ends once. It reports the
objective after every epoch (step = epoch, from 1) and may be pruned there. It checkpoints at
every epoch end, so that a retry of a lost worker's trial continues from its last epoch, in the
same MLflow run, and never trains an epoch twice.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import threading
import uuid

import optuna

from cnnexp import runtime
from cnnexp.config import compose_config, effective_overrides, overrides_to_command
from cnnexp.console import say
from cnnexp.run import USER_ERRORS, run
from cnnexp.sweep.space import Sweep, suggest, trial_overrides
from cnnexp.sweep.study import assign_seed, best_trial, checkpoint_root
from cnnexp.tracking import runs, views

# Set by SIGTERM (scancel, Kubernetes). Raising from the signal handler can land inside library
# code that swallows it, so the flag is also checked at every batch end and before every trial.
STOP_REQUESTED = threading.Event()


class Interrupted(KeyboardInterrupt):
    """SIGTERM handled like Ctrl-C: the trial is marked FAIL, its run KILLED, the worker exits."""


SHORT = {"kernel": "k", "width": "w", "filters": "f", "train.batch_size": "bs", "train.epochs": "ep",
         "train.lr": "lr", "train.seed": "seed", "train.optimizer": "", "model": "", "dataset": "", "task": ""}


def describe(values: dict) -> str:
    """Short words for a configuration, e.g. 'k5 bs64' (run names, terminal lines)."""
    parts = []
    for key, value in values.items():
        label = SHORT.get(key, key.rsplit(".", 1)[-1] + "=")
        parts.append(f"{label}{value:g}" if isinstance(value, float) else f"{label}{value}")
    return " ".join(parts)


def report_and_prune(trial: optuna.Trial, metric: str, epochs: int, prunable: bool):
    """Report the objective each epoch and prune between epochs (never after the last one)."""
    keras = runtime.keras()

    class ReportAndPrune(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if STOP_REQUESTED.is_set():
                raise Interrupted("SIGTERM")

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(metric)
            if value is None or not math.isfinite(float(value)):
                return  # the NaN guard in train fails the trial with the reason
            trial.report(float(value), step=epoch + 1)
            say(f"  trial {trial.number} epoch {epoch + 1}/{epochs}: " + "  ".join(
                f"{k}={v:.4f}" for k, v in sorted((logs or {}).items())))
            if prunable and epoch + 1 < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} ({metric}={value:.4f})")

    return ReportAndPrune()


class Objective:
    """Callable by `study.optimize`: trains one trial and returns its objective value."""

    def __init__(self, sweep: Sweep, study: optuna.Study, parent_run_id: str | None):
        self.sweep, self.study, self.parent_run_id = sweep, study, parent_run_id
        self.settings = sweep.settings
        self.checkpoints = checkpoint_root(self.settings)

    def __call__(self, trial: optuna.Trial) -> float:
        if STOP_REQUESTED.is_set():
            raise Interrupted("SIGTERM")
        settings, sweep = self.settings, self.sweep
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        fixed = frozen.system_attrs.get("fixed_params")
        # An enqueued trial (a designed cell, a repeat) has its values fixed; an arm of a design
        # (the MNIST CNN) has none of the main task's parameters, so only its fixed keys are asked.
        space = sweep.space if fixed is None else {k: v for k, v in sweep.space.items() if k in fixed}
        values = suggest(trial, space)
        # A retry of a lost worker's trial carries that trial's user attributes (its key, seed, run).
        retry_of = frozen.system_attrs.get("failed_trial", -1) if "trial_key" in trial.user_attrs else None
        repeat_of = trial.user_attrs.get("repeat_of")
        base_seed = int(values.get("train.seed", sweep.base.train.seed))
        if retry_of is not None and "seed" in trial.user_attrs:
            seed = int(trial.user_attrs["seed"])  # a retry resumes the lost trial: same seed, same run
        else:
            seed, _ = assign_seed(self.study, trial, base_seed, str(settings.storage))
        overrides = trial_overrides(sweep, values)
        if seed != base_seed or "train.seed" in values:
            overrides.append(f"train.seed={seed}")
        key = trial.user_attrs.get("trial_key") if retry_of is not None else None
        # The key names a folder that is deleted later: only our own hex keys, never a path from the storage.
        key = key if isinstance(key, str) and re.fullmatch(r"[0-9a-f]{12}", key) else uuid.uuid4().hex[:12]
        folder = self.checkpoints / key
        if retry_of is not None and not (folder / "history.json").exists():
            # No checkpoint here (another machine's folder, or lost before its first epoch): train
            # afresh, in a run of its own, so that no run mixes two trainings.
            trial.set_user_attr("mlflow_run_id", None)
            retry_of = None
        trial.set_user_attr("trial_key", key)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("command", overrides_to_command(overrides))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}:{os.environ.get('CNNEXP_WORKER', '0')}")

        label = describe(values)
        name = (f"t{repeat_of} repeat seed {seed}" if repeat_of is not None else f"t{trial.number} {label}")
        child = self._child_run(trial, name, seed, repeat_of, retry_of)
        if retry_of is None:
            views.log_searched(child, values)  # short columns for the study's view in the MLflow UI
        plain = ", ".join(f"{k}={v}" for k, v in values.items())
        what = (f"repeat of trial {repeat_of} ({plain}), seed {seed}" if repeat_of is not None
                else plain + (f", seed {seed}" if seed != int(sweep.base.train.seed) else ""))
        say(f"trial {trial.number}: {what}" + (f" — resuming trial {retry_of}" if retry_of is not None else ""))
        try:
            cfg = compose_config(effective_overrides([*overrides, "tracking.log_model=false", "train.verbose=0"]))
            epochs = int(cfg.train.epochs)
            with child.system_metrics(bool(settings.get("system_metrics", True))):
                result = run(cfg, overrides=overrides, parent_run_id=self.parent_run_id, run_id=child.run_id,
                             run_name=name, checkpoint_dir=folder, validated=True,
                             callbacks=[report_and_prune(trial, str(settings.metric), epochs,
                                                         prunable=repeat_of is None)])
            value = float(result.metrics[str(settings.metric)])
            if not math.isfinite(value):
                raise ValueError(f"{settings.metric} is {value}")
            self._record(trial, result, child, value)
        except optuna.TrialPruned as err:
            trial.set_user_attr("pruned", str(err))
            child.set_tags({"optuna.trial_state": "PRUNED"})
            child.rename(f"{name} (pruned)")
            child.end("FINISHED")  # stopped early by design, not crashed: see the README
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except BaseException as err:
            interrupted = isinstance(err, KeyboardInterrupt)
            error = (f"interrupted ({str(err) or 'Ctrl-C'}); rerun the sweep to resume it from its last epoch"
                     if interrupted else f"{type(err).__name__}: {err}")
            trial.set_user_attr("error", error[:2000])
            child.set_tags({"optuna.trial_state": "FAIL"})
            child.end(runs.status_of(err), error=error)
            if interrupted and int(settings.get("retry_failed", 0)) > 0:
                # Ctrl-C, or SIGTERM from a preempting scheduler: keep the checkpoint and queue the
                # trial again, like a lost worker's; the next run continues it from its last epoch.
                self._queue_retry(trial)
            else:
                shutil.rmtree(folder, ignore_errors=True)
            if not interrupted and not isinstance(err, USER_ERRORS):
                say(f"  trial {trial.number} failed: {error}")
            raise
        shutil.rmtree(folder, ignore_errors=True)  # never left behind on success
        return value

    def _queue_retry(self, trial: optuna.Trial) -> None:
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        history = [*frozen.system_attrs.get("retry_history", []), trial.number]
        if len(history) > int(self.settings.retry_failed):
            return
        attrs = {k: v for k, v in frozen.user_attrs.items() if k not in ("error", "pruned")}
        self.study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            user_attrs=attrs, intermediate_values=frozen.intermediate_values,
            system_attrs={**{k: v for k, v in frozen.system_attrs.items() if k != "fixed_params"},
                          "failed_trial": history[0], "retry_history": history}))

    def _child_run(self, trial, name, seed, repeat_of, retry_of) -> runs.Run:
        run_id = trial.user_attrs.get("mlflow_run_id") if retry_of is not None else None
        if run_id:  # the lost trial's run: the retry logs into it, so each epoch appears once
            child = runs.Run(run_id)
            child.reopen()
            child.set_tags({"optuna.trial_number": trial.number, "optuna.trial_state": "RUNNING"})
            return child
        if self.parent_run_id is None:
            return runs.Run(None)
        tags = {"optuna.study_name": self.settings.study_name, "optuna.trial_number": trial.number,
                "optuna.trial_state": "RUNNING", "cnnexp.seed": seed,
                **({"cnnexp.repeat_of": repeat_of} if repeat_of is not None else {})}
        child = runs.open_run(self.sweep.base.tracking, name, tags, self.parent_run_id)
        if child.run_id:
            trial.set_user_attr("mlflow_run_id", child.run_id)
        return child

    def _record(self, trial, result, child, value) -> None:
        if trial.user_attrs.get("error"):
            trial.set_user_attr("error", None)  # a retry copies the lost attempt's attributes
        # Epochs restored from a checkpoint whose report did not reach the study before the kill.
        reported = self.study.get_trials(deepcopy=False)[trial.number].intermediate_values
        for epoch, score in enumerate(result.history.get(str(self.settings.metric), []), start=1):
            if epoch not in reported and math.isfinite(score):
                trial.report(score, step=epoch)
        for key in ("test_accuracy", "test_loss", "train_seconds", "images_per_second"):
            trial.set_user_attr(key, result.metrics[key])
        trial.set_user_attr("epochs_run", int(result.metrics["epochs_run"]))
        trial.set_user_attr("params", result.cost.params)
        trial.set_user_attr("flops_per_image", result.cost.flops)
        trial.set_user_attr("epochs_trained_here", int(result.metrics["epochs_run"]) - result.resumed_from_epoch)
        if result.resumed_from_epoch:
            trial.set_user_attr("resumed_from_epoch", result.resumed_from_epoch)
        if result.warnings:
            trial.set_user_attr("flag", "; ".join(result.warnings))
        if result.dataset_note:
            trial.set_user_attr("dataset_note", result.dataset_note)
        child.set_tags({"optuna.trial_state": "COMPLETE"})
        log_models = str(self.settings.log_models)
        if child.active and (log_models == "all" or (log_models == "best" and self._is_new_best(trial, value))):
            uri = child.log_model(result.model, result.example)
            if uri and log_models == "best" and trial.user_attrs.get("repeat_of") is None:
                version = child.register(uri, f"cnnexp-{self.settings.study_name}")
                if version:
                    trial.set_user_attr("registered_version", version)
        child.end("FINISHED")

    def _is_new_best(self, trial, value: float) -> bool:
        if trial.user_attrs.get("repeat_of") is not None:
            return False
        design = self.sweep.design
        if design is not None:  # the champion is the main task's best; an arm's model is another task's
            if trial.params.get("task") != design.main:
                return False
            done = [t.value for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    if t.params.get("task") == design.main and t.number != trial.number]
            maximize = self.study.direction == optuna.study.StudyDirection.MAXIMIZE
            return not done or (value > max(done) if maximize else value < min(done))
        best = best_trial(self.study)
        if best is None:
            return True
        maximize = self.study.direction == optuna.study.StudyDirection.MAXIMIZE
        return value > best.value if maximize else value < best.value

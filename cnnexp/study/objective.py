"""One trial: the Optuna objective that `study.optimize` calls.

A trial is exactly `python -m cnnexp.run <fixed overrides> <its data> <its values>`, run in this
process, logged as an MLflow child run that this module creates and ends once. Its config is
composed once; its data come from the study's plan (the rung, as a value) and its seed, which in a
designed study also draws its training subset (`dataset.subset_seed`): every run is a replicate
of its own. It reports the objective after every epoch (step = epoch, from 1) where something
reads a curve (pruning, the long curve) and may be pruned there; elsewhere it validates once, at
the end, and keeps which evaluation images it got right. It checkpoints at every epoch end, so
that a retry of a lost worker's trial continues from its last epoch, in the same MLflow run, and
never trains an epoch twice.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass, field

import optuna
from omegaconf import DictConfig, OmegaConf

from cnnexp import record, runtime, stop
from cnnexp.config import compose_config, effective_overrides, overrides_to_command
from cnnexp.console import say
from cnnexp.design import TASK, config_key, short_label
from cnnexp.errors import CnnexpError
from cnnexp.run import DatasetMemo, RunResult, run
from cnnexp.study import side_by_side
from cnnexp.study.optuna_study import LOST, UNPREPARED, assign_seed, checkpoint_root
from cnnexp.study.settings import objectives
from cnnexp.study.space import Sweep, suggest, trial_overrides
from cnnexp.tracking import runs, views
from cnnexp.train.compiled import ModelCache


def report_and_prune(trial: optuna.Trial, metric: str, epochs: int, prunable: bool, report: bool = True):
    """Report the objective each epoch and prune between epochs (never after the last one)."""
    keras = runtime.keras()

    class ReportAndPrune(keras.callbacks.Callback):  # a stop is heard at batch ends by fit's own callback
        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(metric)
            say(f"  trial {trial.number} epoch {epoch + 1}/{epochs}: " + "  ".join(
                f"{k}={v:.4f}" for k, v in sorted((logs or {}).items())))
            if value is None or not math.isfinite(float(value)):
                return  # validated once at the end; or the NaN guard fails the trial with the reason
            if report:  # Optuna keeps no intermediate values for several objectives
                trial.report(float(value), step=epoch + 1)
            if prunable and epoch + 1 < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} ({metric}={value:.4f})")

    return ReportAndPrune()


class StaleTrialCallback:
    """Called by Optuna when a trial's heartbeat went stale (its worker is gone): end its run, queue a retry."""

    def __init__(self, retries: int, uri: str | None):
        self.retries, self.uri = retries, uri  # the sweep's own MLflow store
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=retries, inherit_intermediate_values=True) if retries else None

    def __call__(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        facts = record.read_trial(frozen)
        if facts.mlflow_run_id and self.uri:
            from cnnexp.tracking import store

            store.use(self.uri)
            lost = runs.Run(facts.mlflow_run_id)
            will_retry = self.retry is not None and len(record.retry_history(frozen)) < self.retries
            lost.set_tags({"optuna.trial_state": "RETRYING" if will_retry else "FAIL"})
            lost.end("FAILED",
                     error=LOST + ("; resumed from its last checkpoint by another worker" if will_retry else ""))
        if self.retry is not None:
            self.retry(study, frozen)


@dataclass
class Attempt:
    """What one call of the objective is about to train."""

    values: dict
    overrides: list[str]
    cfg: DictConfig          # composed once, with its seed
    seed: int
    key: str                 # names the checkpoint folder
    retry_of: int | None     # the lost trial it resumes (None: a fresh training)
    repeat_of: int | None
    name: str                # the MLflow run's name
    curve: bool = True       # validate every epoch (something reads the curve)
    keep_correct: set[int] = field(default_factory=set)


class Objective:
    """Callable by `study.optimize`: trains one trial and returns its objective value."""

    def __init__(self, sweep: Sweep, study: optuna.Study, parent_run_id: str | None):
        self.sweep, self.study, self.parent_run_id = sweep, study, parent_run_id
        self.settings, self.design = sweep.settings, sweep.design
        self.plan = record.read_study(study).plan  # read once: a study's plan never changes
        self.checkpoints = checkpoint_root(self.settings)
        self.datasets = DatasetMemo()  # the trials of this process share one decoded dataset
        self.models = ModelCache()  # and the compiled model of the cell they train (re-initialised per seed)
        self.multi = len(objectives(self.settings)) > 1  # accuracy against cost: Optuna can't prune those
        self.unprepared: str | None = None  # a trial that could not even be set up: the sweep stops on it
        self.on_trial_done = None  # called for each trial it claimed itself (towers), as optimize's callbacks are

    def __call__(self, trial: optuna.Trial) -> float:
        stop.check()
        try:
            attempt = self._prepare(trial)
        except BaseException as err:
            self._unprepared(trial, err)
            raise
        if side_by_side.towers(self, attempt) <= 1:
            return self._single(trial, attempt)
        with contextlib.ExitStack() as heartbeats:  # the trials it claims beat as `study.optimize`'s own does
            group = side_by_side.companions(self, trial, attempt, heartbeats)
            return side_by_side.train(self, group) if len(group) > 1 else self._single(trial, attempt)

    def _single(self, trial: optuna.Trial, attempt: Attempt, child: runs.Run | None = None):
        """Train one trial as one model; record it, or fail it with its reason (and raise)."""
        child = child or self._child_run(trial, attempt)
        folder = self.checkpoints / attempt.key
        try:
            # A stop is heard at a batch end or when the run returns, never raised inside TensorFlow's building or
            # dispatch (a worker was seen to segfault on a SIGTERM 2 s into its trial).
            with child.system_metrics(bool(self.settings.system_metrics)), stop.deferred():
                result = run(attempt.cfg, overrides=attempt.overrides, parent_run_id=self.parent_run_id,
                             run_id=child.run_id, run_name=attempt.name, checkpoint_dir=folder, validated=True,
                             datasets=self.datasets, curve=attempt.curve, keep_correct=attempt.keep_correct,
                             models=self.models,
                             callbacks=[report_and_prune(trial, str(self.settings.metric),
                                                         int(attempt.cfg.train.epochs),
                                                         prunable=attempt.repeat_of is None and not self.multi,
                                                         report=not self.multi)])
            values = [self._value(result, metric) for metric, _ in objectives(self.settings)]
            self._record(trial, result, child, values[0])
        except optuna.TrialPruned as err:
            record.write(trial, pruned=str(err))
            child.set_tags({"optuna.trial_state": "PRUNED"})
            child.rename(f"{attempt.name} (pruned)")
            child.end("FINISHED")  # stopped early by design, not crashed: see the README
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except BaseException as err:
            self._failed(trial, child, folder, err)
            raise
        shutil.rmtree(folder, ignore_errors=True)  # never left behind on success
        return values if self.multi else values[0]

    @staticmethod
    def _value(result: RunResult, metric: str) -> float:
        costs = {"model.num_params": result.cost.params, "model.flops_per_image": result.cost.flops}
        value = float(costs[metric] if metric in costs else result.metrics[metric])
        if not math.isfinite(value):
            raise ValueError(f"{metric} is {value}")
        return value

    def _prepare(self, trial: optuna.Trial) -> Attempt:
        """The trial's values, data, seed, config and checkpoint key; says on the terminal what starts."""
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        fixed, facts = record.fixed_params(frozen), record.read_trial(frozen)
        # An enqueued trial (a designed cell, a repeat) has its values fixed; an arm of a design
        # (the MNIST CNN) has none of the main task's parameters, so only its fixed keys are asked.
        space = self.sweep.space if fixed is None else {k: v for k, v in self.sweep.space.items() if k in fixed}
        values = suggest(trial, space)
        limit = facts.train_limit or (self.plan.train_limit if self.plan is not None else None)
        overrides = trial_overrides(self.sweep, values, [f"dataset.train_limit={limit}"] if limit else [])
        cfg = compose_config(effective_overrides([*overrides, "tracking.log_model=false", "train.verbose=0"]))
        retry_of = facts.retry_of if facts.trial_key else None
        wanted = int(cfg.train.seed)  # an arm may start its seeds elsewhere
        if retry_of is not None and facts.seed is not None:
            seed = facts.seed  # a retry resumes the lost trial: same seed, same run
        else:
            seed = assign_seed(self.study, trial, wanted, str(self.settings.storage), unique=self.design is not None)
        if seed != wanted or "train.seed" in values:
            overrides.append(f"train.seed={seed}")
            OmegaConf.update(cfg, "train.seed", seed)
        if self.design is not None:  # every run of a design draws its own training subset: its replicate
            subset = int(cfg.dataset.subset_seed) + seed
            overrides.append(f"dataset.subset_seed={subset}")
            OmegaConf.update(cfg, "dataset.subset_seed", subset)
        key = self._checkpoint_key(trial, facts, retry_of)
        if key != facts.trial_key:
            retry_of = None
        record.write(trial, trial_key=key, overrides=overrides, command=overrides_to_command(overrides),
                     predicted_s=self._predicted(values, limit), train_limit=cfg.dataset.get("train_limit"),
                     subset_seed=int(cfg.dataset.subset_seed),
                     worker=f"{socket.gethostname()}:{os.getpid()}:{os.environ.get('CNNEXP_WORKER', '0')}")
        label = f"t{facts.repeat_of} repeat seed {seed}" if facts.repeat_of is not None else \
            f"t{trial.number} {short_label(values)}" + (f" at {limit:,}" if facts.confirms else "")
        plain = ", ".join(f"{k}={v}" for k, v in values.items())
        what = (f"repeat of trial {facts.repeat_of} ({plain}), seed {seed}" if facts.repeat_of is not None
                else plain + (f", seed {seed}" if seed != wanted else "")
                + (f", confirming at {limit:,} training images" if facts.confirms else ""))
        say(f"trial {trial.number}: {what}" + (f" — resuming trial {retry_of}" if retry_of is not None else ""))
        curve, keep = self._validation(values, cfg)
        return Attempt(values, overrides, cfg, seed, key, retry_of, facts.repeat_of, label, curve, keep)

    def _checkpoint_key(self, trial: optuna.Trial, facts: record.TrialRecord, retry_of: int | None) -> str:
        # The key names a folder that is deleted later: only our own hex keys, never a path from the storage.
        key = facts.trial_key if retry_of is not None and re.fullmatch(r"[0-9a-f]{12}", facts.trial_key or "") else None
        if key is None or not (self.checkpoints / key / "history.json").exists():
            # No checkpoint here (another machine's folder, or lost before its first epoch): train
            # afresh, in a run of its own, so that no run mixes two trainings.
            key = uuid.uuid4().hex[:12]
            if facts.mlflow_run_id:  # a retry inherits the lost trial's run id: cleared, so a new run opens
                record.write(trial, mlflow_run_id=None)
        return key

    def _validation(self, values: dict, cfg: DictConfig) -> tuple[bool, set[int]]:
        """Whether this trial validates every epoch, and after which epochs it keeps its right/wrong images.

        A design reads a curve only from its long arm; a search keeps its curves (pruning, its report).
        """
        epochs = int(cfg.train.epochs)
        if self.design is None:
            return True, set()
        if cfg.train.early_stopping.enabled:
            return True, {epochs}
        if values.get(TASK) == self.design.curve_arm:
            return True, {self.design.base_epochs, epochs}
        return False, set()

    def _predicted(self, values: dict, images: int | None) -> float | None:
        """The planner's prediction of this trial's seconds (recorded, so the report can say how good it was)."""
        if self.plan is None:
            return None
        try:
            return round(self.plan.predict(config_key(values) if self.design is not None else "base", images=images), 1)
        except KeyError:
            return None

    def _unprepared(self, trial: optuna.Trial, err: BaseException) -> None:
        """A trial that could not be set up fails with its own reason (never 'worker lost'); the sweep stops on it."""
        interrupted = isinstance(err, KeyboardInterrupt)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        error = f"{UNPREPARED}: {'interrupted' if interrupted else type(err).__name__}: {reason}"
        record.write(trial, error=error[:2000])
        if not interrupted:
            self.unprepared = f"trial {trial.number} {error}"

    def _child_run(self, trial: optuna.Trial, attempt: Attempt) -> runs.Run:
        run_id = record.read_trial(self.study.get_trials(deepcopy=False)[trial.number]).mlflow_run_id
        if attempt.retry_of is not None and run_id:  # the lost trial's run: each epoch appears once
            child = runs.Run(run_id)
            child.reopen()
            child.set_tags({"optuna.trial_number": trial.number, "optuna.trial_state": "RUNNING"})
            return child
        if self.parent_run_id is None:
            return runs.Run(None)
        tags = {"optuna.study_name": self.settings.study_name, "optuna.trial_number": trial.number,
                "optuna.trial_state": "RUNNING", "cnnexp.seed": attempt.seed,
                **({"cnnexp.repeat_of": attempt.repeat_of} if attempt.repeat_of is not None else {})}
        child = runs.open_run(self.sweep.base.tracking, attempt.name, tags, self.parent_run_id)
        if child.run_id:
            record.write(trial, mlflow_run_id=child.run_id)
            views.log_searched(child, attempt.values)  # short columns for the study's view in the MLflow UI
        return child

    def _failed(self, trial: optuna.Trial, child: runs.Run, folder, err: BaseException) -> None:
        interrupted = isinstance(err, KeyboardInterrupt)
        error = (f"interrupted ({str(err) or 'SIGINT'}); rerun the sweep to resume it from its last epoch"
                 if interrupted else f"{type(err).__name__}: {err}")
        record.write(trial, error=error[:2000])
        child.set_tags({"optuna.trial_state": "FAIL"})
        child.end(runs.status_of(err), error=error)
        if interrupted and int(self.settings.retry_failed) > 0:
            # A stop signal (Ctrl-C, SIGTERM from a preempting scheduler, SIGHUP): keep the checkpoint
            # and queue the trial again, like a lost worker's; the next run continues it from its last epoch.
            self._queue_retry(trial)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        if not interrupted and not isinstance(err, CnnexpError):
            say(f"  trial {trial.number} failed: {error}")

    def _queue_retry(self, trial: optuna.Trial) -> None:
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        history = [*record.retry_history(frozen), trial.number]
        if len(history) > int(self.settings.retry_failed):
            return
        system = {k: v for k, v in frozen.system_attrs.items() if k != "fixed_params"}
        self.study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            user_attrs=record.carried(frozen), intermediate_values=frozen.intermediate_values,
            system_attrs={**system, "failed_trial": history[0], "retry_history": history}))

    def _record(self, trial: optuna.Trial, result: RunResult, child: runs.Run, value: float) -> None:
        # Epochs restored from a checkpoint whose report did not reach the study before the kill.
        reported = self.study.get_trials(deepcopy=False)[trial.number].intermediate_values
        for epoch, score in enumerate(result.history.get(str(self.settings.metric), []), start=1):
            if epoch not in reported and math.isfinite(score) and not self.multi:
                trial.report(score, step=epoch)
        metrics = result.metrics
        record.write(trial, error=None, test_accuracy=metrics["test_accuracy"], test_loss=metrics["test_loss"],
                     train_seconds=metrics["train_seconds"], images_per_second=metrics["images_per_second"],
                     epochs_run=int(metrics["epochs_run"]), num_params=result.cost.params, flops=result.cost.flops,
                     epochs_trained_here=int(metrics["epochs_run"]) - result.resumed_from_epoch,
                     resumed_from_epoch=result.resumed_from_epoch or None, train_images=result.train_images,
                     updates=result.updates,
                     epoch_seconds=[round(s, 3) for s in result.history.get("epoch_seconds", [])],
                     step_seconds=round(sum(result.history.get("epoch_seconds", [])) - sum(
                         result.history.get("val_seconds", [])), 3),
                     eval_images=result.eval_images, test_images=result.test_images,
                     num_classes=result.num_classes, flag="; ".join(result.warnings) or None,
                     dataset_note=result.dataset_note or None, checkpoint_error=result.checkpoint_error,
                     eval_correct={str(e): record.pack(c) for e, c in result.correct.items()} or None)
        child.set_tags({"optuna.trial_state": "COMPLETE"})
        log_models = str(self.settings.log_models)
        best = log_models == "best" and not self.multi and self._is_new_best(trial, value)
        if child.active and (log_models == "all" or best or (self.multi and log_models != "none")):
            # A multi-objective study keeps every model: the champion is chosen on the front at the end.
            uri = child.log_model(result.model, result.example)
            if uri and best:
                version = child.register(uri, f"cnnexp-{self.settings.study_name}")
                if version:
                    record.write(trial, registered_version=version)
        child.end("FINISHED")

    def _is_new_best(self, trial: optuna.Trial, value: float) -> bool:
        """Whether this trial beats every other complete one (of a design's main task: an arm is another task)."""
        facts = record.read_trial(self.study.get_trials(deepcopy=False)[trial.number])
        if facts.repeat_of is not None or facts.confirms is not None:
            return False
        main = self.design.main if self.design is not None else None
        if main is not None and trial.params.get(TASK) != main:
            return False
        best = record.best_trial(self.study, main)
        if best is None or best.number == trial.number:
            return True
        maximize = self.study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        return value > best.values[0] if maximize else value < best.values[0]

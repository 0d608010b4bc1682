"""What a study costs, and which rung of training-set sizes and how many seeds fit a compute budget.

One timer for everything that predicts seconds (the plan, the estimate, the benchmarks): a short
run of a configuration through the trials' own training path (`cnnexp.run.run`, tracking off,
the study's evaluation set), split into a cost model (`cnnexp.plan.Timing`)

    seconds of a trial = fixed + epochs x (train images x per_image + per_epoch)

A plan must not move with the weather. So the first epoch of a timing run is a warm-up (tracing,
caches), every later batch is timed on its own, and the cost per image is the *median* over those
batches (one slow moment moves a median little); it is measured in CPU seconds as well as wall
seconds, and the rung is chosen on the CPU seconds (the work, which a process competing for the
cores hardly changes) divided by the parallelism this machine gives a trial when it is alone. The
sizes are a fixed ladder that doubles (`cnnexp.plan.LADDER`): the largest rung whose first round
fits its share of the budget. `dataset.train_limit=N` pins the size and skips the choice. The wall
seconds, as timed, are what the plan predicts; predictions are recalibrated from the trials that
finished (`calibration`), which moves the number of seeds, never the rung.
"""

from __future__ import annotations

import os
import statistics
import time

import optuna

from cnnexp import record, runtime, stop, stores
from cnnexp.config import compose_config
from cnnexp.console import say
from cnnexp.design import TASK, config_key
from cnnexp.errors import ConfigError
from cnnexp.plan import Plan, PlannedCell, Timing, rungs
from cnnexp.record import TrialRecord
from cnnexp.run import DatasetMemo, prepare, run
from cnnexp.study.settings import parse_budget
from cnnexp.study.space import Sweep, trial_overrides

TIMING_BATCHES = 12       # steady batches timed per configuration (after a warm-up epoch)
TIMING_EVAL = 500         # images a timing run validates and tests on; the study's own sizes are scaled from these
TRACKING_SECONDS = 2.0    # what MLflow adds to a trial (child run, params, metrics), measured here
# CPU seconds per wall second TensorFlow's training gets on this machine when nothing else runs: its threads
# over the cores it may use, less what synchronisation costs (measured here: about 1.7 on 2 cores).
EFFICIENCY = 0.85


def parallelism() -> float:
    """What a trial alone gets: the cores this process may use, at TensorFlow's measured efficiency."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1.0, cores * EFFICIENCY)


def batch_timer():
    """A Keras callback timing each training batch, each epoch and each validation, in wall and CPU seconds (the
    process's CPU, all threads)."""
    keras = runtime.keras()

    class BatchTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.wall, self.cpu, self.epoch = [], [], 0
            self.epoch_cpu, self.val_cpu = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self._began, self._val = epoch, time.process_time(), 0.0
            self._mark()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_cpu.append(time.process_time() - self._began)
            self.val_cpu.append(self._val)

        def on_test_begin(self, logs=None):  # the validation inside `fit`
            self._test = time.process_time()

        def on_test_end(self, logs=None):
            self._val += time.process_time() - self._test

        def _mark(self):
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_train_batch_begin(self, batch, logs=None):
            stop.check()  # a stop signal ends the plan's timing too
            self._mark()

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch > 0:  # the first epoch warms up: tracing, allocations, caches
                self.wall.append(time.perf_counter() - self._wall)
                self.cpu.append(time.process_time() - self._cpu)

    return BatchTimer()


def time_config(overrides: list[str], datasets=None, cap: int | None = None) -> Timing:
    """Time one configuration: a warm-up epoch, then at least TIMING_BATCHES batches one by one, through `run`.

    `cap`: the training images there are (a small dataset is timed on all of it).
    """
    study = compose_config(overrides)
    batch = int(study.train.batch_size)
    images = max(1000, (TIMING_BATCHES + 1) // 2 * batch)  # two timed epochs hold TIMING_BATCHES batches
    images = min(images, cap) if cap else images
    small = [*overrides, f"dataset.train_limit={images}", f"dataset.test_limit={TIMING_EVAL}", "train.epochs=3",
             "tracking=off", "train.verbose=0"]
    if study.dataset.get("eval_limit") is not None:
        small.append(f"dataset.eval_limit={TIMING_EVAL}")
    cfg = compose_config(small)
    prepare(cfg, validated=True, datasets=datasets)  # decoding is not a trial's cost: it happens once
    timer = batch_timer()
    began, cpu_began = time.perf_counter(), time.process_time()
    result = run(cfg, validated=True, datasets=datasets, callbacks=[timer])
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    seconds, validation = result.history["epoch_seconds"], result.history.get("val_seconds", [0.0] * 3)
    wall_part = _part(statistics.median(timer.wall) / batch, seconds, validation, result, study)
    cpu_part = _part(statistics.median(timer.cpu) / batch, timer.epoch_cpu, timer.val_cpu, result, study)
    return Timing(fixed=max(wall - sum(seconds), 0.0) + wall_part[2] + TRACKING_SECONDS, per_image=wall_part[0],
                  per_epoch=wall_part[1], cpu_per_image=cpu_part[0], parallelism=parallelism(),
                  cpu_fixed=max(cpu - sum(timer.epoch_cpu), 0.0) + cpu_part[2] + TRACKING_SECONDS,
                  cpu_per_epoch=cpu_part[1])


def _part(per_image: float, epochs: list[float], validation: list[float], result, study) -> tuple[float, float, float]:
    """(per training image, per validation pass at the study's size, the fixed part of the timed epochs and the
    test split), from one clock's per-image median and its per-epoch seconds."""
    per_eval_image = statistics.median(validation[1:]) / max(result.eval_images, 1)
    steady = per_image * result.train_images + statistics.median(validation[1:])  # an epoch at the median batch
    first = max(epochs[0] - steady, 0.0)  # what the first epoch took beyond a steady one: tracing
    test_extra = per_eval_image * max(0, int(study.dataset.test_limit or 10_000) - result.test_images)
    if study.dataset.get("eval_limit") is not None:  # a fixed evaluation set: a cost per pass
        return per_image, per_eval_image * int(study.dataset.eval_limit), first + test_extra
    # A share of the training subset validates: a cost per training image.
    return per_image + per_eval_image * float(study.train.val_fraction), 0.0, first + test_extra


def _total(cells: list[PlannedCell], timings: dict[str, Timing], images: int, work: bool = False) -> float:
    def one(c):
        timing = timings[c.cell]
        return (timing.work if work else timing.predict)(c.images or images, c.epochs, c.validations)

    return sum(c.runs * one(c) for c in cells)


def plan(cells: list[PlannedCell], budget_s: float, full_train: int, share: float, datasets=None,
         timings: dict[str, Timing] | None = None, pinned: int | None = None) -> Plan:
    """The largest rung of training images whose first round fits `share` of the budget (or the pinned size).

    Raises:
        ConfigError: even the smallest rung (or the pinned size) does not fit; the message gives the budget that would.
    """
    timings = timings or {}
    for c in cells:
        if c.cell not in timings:
            stop.check()
            timings[c.cell] = time_config(c.overrides, datasets, cap=c.images or full_train)
    ladder = [pinned] if pinned else rungs(full_train)
    fitting = [r for r in ladder if _total(cells, timings, r, work=True) <= share * budget_s]
    if not fitting:
        needed = _total(cells, timings, ladder[0], work=True) / share
        what = f"dataset.train_limit={pinned}" if pinned else f"{ladder[0]:,} training images each"
        raise ConfigError(f"sweep.budget={budget_s / 60:g} min can't fit this study: its first round "
                          f"({sum(c.runs for c in cells)} trials, {what}) needs about {needed / 60:.1f} min with the "
                          f"seeds that follow; give sweep.budget={int(needed / 60) + 1}m or more, or fewer cells or "
                          "seeds.")
    images = max(fitting)
    planned = [PlannedCell(c.cell, c.overrides, c.runs, c.epochs, c.images, timings[c.cell], c.validations)
               for c in cells]
    return Plan(budget_s=budget_s, train_limit=images, full_train=full_train,
                first_round_s=_total(cells, timings, images), trials=sum(c.runs for c in cells),
                device=runtime.device_description(), share=share, cells=planned, pinned=bool(pinned))


def calibration(plan: Plan, records: list[TrialRecord], cell_of) -> float:
    """Actual over predicted seconds of the trials that completed (1.0 before any): the planner's correction."""
    actual = predicted = 0.0
    for facts in records:
        if facts.complete and facts.duration_s and facts.retry_of is None and facts.resumed_from_epoch is None \
                and facts.confirms is None:
            try:
                predicted += plan.predict(cell_of(facts))
            except KeyError:
                continue
            actual += facts.duration_s
    return actual / predicted if predicted else 1.0


def estimate(overrides: list[str], trials: int, epochs: int, train_images: int, datasets=None) -> str:
    """Before a long sweep without a budget: what it will cost, from one timed configuration (no GPU only)."""
    timing = time_config(overrides, datasets)
    minutes = trials * timing.predict(train_images, epochs) / 60
    return (f"No GPU found ({runtime.device_description()}): up to {trials} trials x {epochs} epochs x "
            f"{train_images:,} training images, at ~{1 / timing.per_image:.0f} images/s of the base configuration: "
            f"roughly {minutes:.1f} min (pruning and other configurations change this; sweep.budget plans instead).")


def planned_cells(sweep: Sweep) -> list[PlannedCell]:
    """What the first round trains, per configuration (a design's cells; else n_trials of the base config)."""
    if sweep.design is None:
        return [PlannedCell("base", list(sweep.overrides), int(sweep.settings.n_trials), int(sweep.base.train.epochs))]
    cells = []
    for cell, count in sweep.design.first_round():
        overrides = trial_overrides(sweep, cell)
        cfg = compose_config(overrides)
        images = len(prepare(cfg, validated=True)[1].y_train) if sweep.design.own_data(cell[TASK]) else None
        # Only the long curve validates every epoch; every other cell once, after its last epoch (objective.py).
        curve = cell[TASK] == sweep.design.curve_arm or bool(cfg.train.early_stopping.enabled)
        cells.append(PlannedCell(config_key(cell), overrides, count, int(cfg.train.epochs), images, None,
                                 None if curve else 1))
    return cells


def apply_plan(sweep: Sweep, study: optuna.Study) -> Plan | None:
    """With `sweep.budget`: plan the training-set size once per study, store it, say it.

    The plan is stored on the study, so that every worker and every resumed run trains on the
    same data as the first; it reaches each trial as a value (`Objective._prepare`). A study
    without a budget trains what it was told to.
    """
    settings = sweep.settings
    seconds = parse_budget(settings.get("budget"))
    made = record.read_study(study).plan
    if made is None and seconds is None:
        return None
    if made is None:
        with stores.lock(str(settings.storage)):
            made = record.read_study(study).plan
            if made is None:
                say(f"Timing each configuration for sweep.budget={settings.budget} ...")
                pinned = sweep.data_key("dataset.train_limit")
                full = full_train(sweep)
                share = 0.55 if sweep.design is not None and int(sweep.answers.looks) > 1 else 1.0
                made = plan(planned_cells(sweep), seconds, full, share, DatasetMemo(),
                            pinned=int(pinned) if pinned else None)
                record.write_study(study, plan=made)
                say(made.text())
    return made


def full_train(sweep: Sweep) -> int:
    """The training images the main task has without a limit (what the evaluation set leaves)."""
    from cnnexp.data.load import load_raw

    return len(load_raw(sweep.base.dataset).y_train) - int(sweep.data_key("dataset.eval_limit") or 0)

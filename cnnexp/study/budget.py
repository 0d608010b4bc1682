"""What a study costs, and how much data and how many seeds fit a compute budget.

One timer for everything that predicts seconds (the plan, the estimate, the benchmarks): a short
run of a configuration through the trials' own training path (`cnnexp.run.run`, tracking off,
the study's evaluation set), split into a cost model

    seconds of a trial = fixed + epochs x (train images x per_image + per_epoch)

(`fixed`: building, compiling, the first epoch's tracing and the test split; `per_epoch`: the
validation on the evaluation set). With `sweep.budget=45m` a study times each configuration it
will train, picks the largest `dataset.train_limit` whose first round fits its share of the budget,
and keeps the rest for the seeds that settle the answers (`cnnexp.study.rounds`). The plan is
printed before the first trial and stored on the study, so that every worker and every resumed
run trains on the same data: `dataset.train_limit` never changes during a study, surplus time buys
seeds. Predictions are recalibrated from the trials that finished (`calibration`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from cnnexp import runtime
from cnnexp.config import compose_config
from cnnexp.errors import ConfigError
from cnnexp.record import TrialRecord
from cnnexp.run import prepare, run

MIN_TRAIN = 500           # fewer training images than this answer nothing worth the time
TIMING_IMAGES = 1000      # images a timing run trains on, for 2 epochs
TIMING_EVAL = 500         # images it validates and tests on; the study's own sizes are scaled from these
TRACKING_SECONDS = 2.0    # what MLflow adds to a trial (child run, params, metrics), measured here


@dataclass
class Timing:
    """One configuration's cost model (seconds)."""

    fixed: float
    per_image: float
    per_epoch: float

    def predict(self, images: int, epochs: int) -> float:
        return self.fixed + epochs * (images * self.per_image + self.per_epoch)


def time_config(overrides: list[str], datasets=None) -> Timing:
    """Time one configuration: 2 short epochs through `run`, with the study's evaluation set."""
    study = compose_config(overrides)
    small = [*overrides, f"dataset.train_limit={TIMING_IMAGES}", f"dataset.test_limit={TIMING_EVAL}", "train.epochs=2",
             "tracking=off", "train.verbose=0"]
    if study.dataset.get("eval_limit") is not None:
        small.append(f"dataset.eval_limit={TIMING_EVAL}")
    cfg = compose_config(small)
    prepare(cfg, validated=True, datasets=datasets)  # decoding is not a trial's cost: it happens once
    began = time.perf_counter()
    result = run(cfg, validated=True, datasets=datasets)
    wall = time.perf_counter() - began
    seconds, validation = result.history["epoch_seconds"], result.history.get("val_seconds", [0.0, 0.0])
    steady = seconds[-1]
    per_image = max(steady - validation[-1], 1e-6) / max(result.train_images, 1)
    # Validation and test scale with their images: the study's sizes, from what the timing run measured.
    per_eval_image = validation[-1] / max(result.eval_images, 1)
    test_extra = per_eval_image * max(0, int(study.dataset.test_limit or 10_000) - result.test_images)
    if study.dataset.get("eval_limit") is not None:  # a fixed evaluation set: a cost per epoch
        per_epoch = per_eval_image * int(study.dataset.eval_limit)
    else:  # a share of the training subset validates: a cost per image
        per_epoch, per_image = 0.0, per_image + per_eval_image * float(study.train.val_fraction)
    return Timing(fixed=max(wall - sum(seconds), 0.0) + (seconds[0] - steady) + TRACKING_SECONDS + test_extra,
                  per_image=per_image, per_epoch=per_epoch)


@dataclass
class Planned:
    """One configuration of a plan: its overrides, runs in the first round, epochs, and images (None: ours to pick)."""

    cell: str
    overrides: list[str]
    runs: int
    epochs: int
    images: int | None = None
    timing: dict = field(default_factory=dict)


@dataclass
class Plan:
    budget_s: float
    train_limit: int              # training images per main-task trial
    full_train: int               # what the sweep would train on without a budget
    first_round_s: float          # predicted seconds of the first round
    trials: int
    device: str
    share: float                  # of the budget the first round may use; the rest buys seeds
    cells: list[dict] = field(default_factory=list)  # the `Planned` cells, with their timing

    def text(self) -> str:
        shrunk = (f"{self.train_limit:,} of the {self.full_train:,} training images" if self.train_limit < self.full_train
                  else f"all {self.full_train:,} training images")
        later = self.budget_s - self.first_round_s
        return (f"Plan for sweep.budget={self.budget_s / 60:.0f} min on {self.device}: a first round of {self.trials} "
                f"trials on {shrunk} (dataset.train_limit={self.train_limit}), predicted {self.first_round_s / 60:.1f} "
                f"min; the other {max(later, 0) / 60:.1f} min add seeds where the answers are not settled yet.")

    def predict(self, cell: str, calibration: float = 1.0) -> float:
        """Seconds of one more trial of `cell`."""
        for planned in self.cells:
            if planned["cell"] == cell:
                images = planned["images"] or self.train_limit
                return calibration * Timing(**planned["timing"]).predict(images, planned["epochs"])
        raise KeyError(cell)


def _total(cells: list[Planned], timings: dict[str, Timing], images: int) -> float:
    return sum(c.runs * timings[c.cell].predict(c.images or images, c.epochs) for c in cells)


def plan(cells: list[Planned], budget_s: float, full_train: int, share: float, datasets=None,
         timings: dict[str, Timing] | None = None) -> Plan:
    """The largest training-set size whose first round fits `share` of the budget.

    Raises:
        ConfigError: even the smallest training set does not fit; the message gives the budget that would.
    """
    timings = timings or {c.cell: time_config(c.overrides, datasets) for c in cells}
    smallest = min(MIN_TRAIN, full_train)
    needed = _total(cells, timings, smallest) / share
    if needed > budget_s:
        runs = sum(c.runs for c in cells)
        raise ConfigError(f"sweep.budget={budget_s / 60:g} min can't fit this study: its first round ({runs} trials, "
                          f"{smallest:,} training images each) needs about {needed / 60:.1f} min with the seeds that "
                          f"follow; give sweep.budget={int(needed / 60) + 1}m or more, or fewer cells or seeds.")
    images = full_train
    while images > smallest and _total(cells, timings, images) > share * budget_s:
        images = max(smallest, int(images * 0.92) // 100 * 100)
    for c in cells:
        c.timing = asdict(timings[c.cell])
    return Plan(budget_s=budget_s, train_limit=images, full_train=full_train,
                first_round_s=_total(cells, timings, images), trials=sum(c.runs for c in cells),
                device=runtime.device_description(), share=share, cells=[asdict(c) for c in cells])


def calibration(plan: Plan, records: list[TrialRecord], cell_of) -> float:
    """Actual over predicted seconds of the trials that completed (1.0 before any): the planner's correction."""
    actual = predicted = 0.0
    for facts in records:
        if facts.complete and facts.duration_s and facts.retry_of is None and facts.resumed_from_epoch is None:
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
    return (f"No GPU found ({runtime.device_description()}): up to {trials} trials x {epochs} epochs x {train_images:,} "
            f"training images, at ~{1 / timing.per_image:.0f} images/s of the base configuration: roughly "
            f"{minutes:.1f} min (pruning and other configurations change this; sweep.budget plans instead).")

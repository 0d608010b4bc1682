"""A compute budget for a study: choose the training-set size that fits, and say so before starting.

`sweep.budget=45m` (or `2h`, `900s`, a number of seconds) makes the study time a few training steps
of every distinct configuration it will train, predict each trial's seconds, and pick the largest
`dataset.train_limit` (up to what the sweep asks for, or the whole training split) whose predicted
total fits the budget. The plan is printed before the first trial, stored on the study (so that
every worker and every resumed run trains on the same data), and repeated in the report. Nothing
is ever shrunk silently: without a budget the sweep trains what it was told to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cnnexp import runtime
from cnnexp.config import compose_config
from cnnexp.errors import ConfigError

# What a trial costs beyond its training steps (validation each epoch, the test split, model
# building and logging), as a share of the training time, and a floor per trial in seconds:
# measured on the quick study (2-core CPU, quarter width): ~25% and ~3 s.
OVERHEAD_SHARE, OVERHEAD_SECONDS = 0.25, 3.0
MIN_TRAIN = 2000  # below this the comparisons are too noisy to be worth the time


def parse_budget(value) -> float | None:
    """'45m' -> 2700.0 seconds; None stays None."""
    if value in (None, "", "null"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value))
    if not match:
        raise ConfigError(f"sweep.budget={value!r} must be a duration such as 45m, 2h or 900s.")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


@dataclass
class Plan:
    budget_s: float
    train_limit: int            # training images per main-task trial (validation is held out of these)
    full_train: int             # what the sweep would train on without a budget
    epochs: int
    trials: int
    predicted_s: float
    device: str

    def text(self) -> str:
        shrunk = (f"{self.train_limit:,} of the {self.full_train:,} training images" if self.train_limit < self.full_train
                  else f"all {self.full_train:,} training images")
        return (f"Plan for sweep.budget={self.budget_s / 60:.0f} min on {self.device}: {self.trials} trials x "
                f"{self.epochs} epochs on {shrunk} (dataset.train_limit={self.train_limit}); predicted "
                f"{self.predicted_s / 60:.0f} min. A larger budget or a GPU trains on more data."
                + (" The prediction exceeds the budget: lower sweep.n_trials or train.epochs."
                   if self.predicted_s > self.budget_s * 1.05 else ""))


def seconds_per_image(overrides: list[str]) -> float:
    """Seconds per training image of one configuration: the second of two short `fit` epochs.

    The first epoch includes tracing and compiling; single `train_on_batch` calls carry a
    per-call overhead that `fit` doesn't have (measured: they read 2x slower), so neither is used.
    """
    from cnnexp.model.build import build_model
    from cnnexp.run import prepare
    from cnnexp.train.callbacks import epoch_timer
    from cnnexp.train.recipe import make_optimizer

    # A small subset is enough to time an epoch, and decodes in a second.
    cfg = compose_config([*overrides, "dataset.train_limit=2500", "dataset.test_limit=200", "tracking=off"])
    layers, dataset = prepare(cfg, validated=True)
    keras = runtime.keras()
    keras.backend.clear_session()
    model = build_model(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding)
    model.compile(optimizer=make_optimizer(cfg.train, 1000), loss="sparse_categorical_crossentropy")
    batch = int(cfg.train.batch_size)
    n = min(len(dataset.y_train), max(512, 8 * batch)) // batch * batch
    timer = epoch_timer()
    model.fit(dataset.x_train[:n], dataset.y_train[:n], batch_size=batch, epochs=2, verbose=0, callbacks=[timer])
    keras.backend.clear_session()
    return timer.seconds[-1] / n


def plan(trial_overrides: list[list[str]], main: list[bool], budget_s: float, full_train: int, epochs: int,
         fixed_train: dict[int, int], images_per_epoch: int | None = None) -> Plan:
    """The largest training-set size for the main-task trials whose predicted total fits `budget_s`.

    Args:
        trial_overrides: the overrides of every trial to run (one entry per trial, seeds included).
        main: per trial, whether its data size is ours to choose (False: an arm with its own data).
        full_train: the main task's training images without a budget.
        fixed_train: per arm trial index, its training images.
    """
    timed: dict[tuple, float] = {}
    per_image = []
    for overrides in trial_overrides:
        key = tuple(overrides)
        if key not in timed:
            timed[key] = seconds_per_image(overrides)
        per_image.append(timed[key])

    def predicted(n: int) -> float:
        total = 0.0
        for i, seconds in enumerate(per_image):
            # dataset.train_limit includes the validation split (train.val_fraction, 10%)
            per_epoch = images_per_epoch or 0.9 * n  # an epoch may be a fixed chunk of a stream
            images = (per_epoch if main[i] else fixed_train.get(i, n)) * epochs
            total += images * seconds * (1 + OVERHEAD_SHARE) + OVERHEAD_SECONDS
        return total

    n = full_train
    while n > MIN_TRAIN and predicted(n) > budget_s and not images_per_epoch:
        n = max(MIN_TRAIN, int(n * 0.9) // 500 * 500)
    return Plan(budget_s=budget_s, train_limit=n, full_train=full_train, epochs=epochs, trials=len(per_image),
                predicted_s=predicted(n), device=runtime.device_description())


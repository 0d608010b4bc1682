"""A budget's plan as a typed value: the training-set size (a rung of a fixed ladder), each cell's cost model.

    seconds of a trial = fixed + epochs x (train images x per_image + per_epoch)

The planner (`cnnexp.study.budget`) times each configuration and picks the largest rung of `LADDER`
whose first round fits its share of the budget. Rungs double, so that the noise of a timing moves
the choice only near a rung's edge, and the choice is made on CPU seconds (the work, which a
competing process hardly changes) rather than wall seconds. The plan is stored on the study, so
every worker and every resumed run trains on the same data; `pinned` says the user fixed the size
(`dataset.train_limit=N`), and `pin` is the override that reproduces the regime elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

LADDER = (500, 1000, 2000, 4000, 8000, 16000, 32000)  # training images per trial; the full set is the last rung


def rungs(full_train: int) -> list[int]:
    """The rungs a dataset of `full_train` training images offers, smallest first (the full set last)."""
    return [r for r in LADDER if r < full_train] + [full_train]


@dataclass(frozen=True)
class Timing:
    """One configuration's cost model: wall seconds as timed, and CPU seconds (the work), per part.

    fixed: building, compiling, the first epoch's tracing, the test split, tracking; per_image: a
    training image; per_epoch: one validation pass. The CPU figures are the process's (all threads).
    """

    fixed: float
    per_image: float
    per_epoch: float
    cpu_per_image: float = 0.0      # what the rung is chosen on (with the other CPU figures)
    parallelism: float = 1.0        # CPU seconds per wall second the machine gives training when it is alone
    cpu_fixed: float = 0.0          # mostly one thread (tracing, Python): counted one to one
    cpu_per_epoch: float = 0.0

    def predict(self, images: int, epochs: int, validations: int | None = None) -> float:
        """Wall seconds of a trial of `epochs` epochs that validates `validations` times (default: every epoch)."""
        passes = epochs if validations is None else validations
        return self.fixed + epochs * images * self.per_image + passes * self.per_epoch

    def work(self, images: int, epochs: int, validations: int | None = None) -> float:
        """Seconds predicted from the work alone (CPU seconds; the parallel parts over the parallelism): steady
        under a competing load, which stretches wall seconds but hardly CPU seconds."""
        if not self.cpu_per_image:
            return self.predict(images, epochs, validations)
        passes = epochs if validations is None else validations
        return self.cpu_fixed + (epochs * images * self.cpu_per_image + passes * self.cpu_per_epoch) / self.parallelism


@dataclass(frozen=True)
class PlannedCell:
    """One configuration of a plan: its runs in the first round, its epochs, its images (None: the rung's)."""

    cell: str
    overrides: list[str]
    runs: int
    epochs: int
    images: int | None = None
    timing: Timing | None = None
    validations: int | None = None  # passes over the evaluation set (None: every epoch; 1: once, at the end)


@dataclass
class Plan:
    budget_s: float
    train_limit: int              # training images per main-task trial: the rung
    full_train: int               # what the sweep would train on without a budget
    first_round_s: float          # predicted seconds of the first round
    trials: int
    device: str
    share: float                  # of the budget the first round may use; the rest buys seeds
    cells: list[PlannedCell] = field(default_factory=list)
    pinned: bool = False          # the user fixed the training-set size: no rung was chosen

    @property
    def pin(self) -> str:
        """The override that reproduces this regime on any machine."""
        return f"dataset.train_limit={self.train_limit}"

    def next_rung(self) -> int | None:
        """The rung above this plan's (2-4x the images), for confirming effects at a higher fidelity."""
        above = [r for r in rungs(self.full_train) if r > self.train_limit]
        return above[0] if above else None

    def text(self) -> str:
        shrunk = (f"{self.train_limit:,} of the {self.full_train:,} training images"
                  if self.train_limit < self.full_train else f"all {self.full_train:,} training images")
        later = self.budget_s - self.first_round_s
        how = ("pinned by dataset.train_limit" if self.pinned else
               f"the largest rung of {', '.join(f'{r:,}' for r in rungs(self.full_train))} that fits")
        return (f"Plan for sweep.budget={self.budget_s / 60:.0f} min on {self.device}: a first round of {self.trials} "
                f"trials on {shrunk} ({how}), predicted {self.first_round_s / 60:.1f} min; the other "
                f"{max(later, 0) / 60:.1f} min add seeds where the answers are not settled yet. This regime "
                f"anywhere: {self.pin}.")

    def predict(self, cell: str, calibration: float = 1.0, images: int | None = None) -> float:
        """Seconds of one more trial of `cell` (at `images` training images: a confirmation at another rung)."""
        for planned in self.cells:
            if planned.cell == cell and planned.timing is not None:
                return calibration * planned.timing.predict(images or planned.images or self.train_limit,
                                                            planned.epochs, planned.validations)
        raise KeyError(cell)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict) -> Plan:
        cells = [PlannedCell(**{**c, "timing": Timing(**c["timing"]) if c.get("timing") else None})
                 for c in stored.get("cells") or []]
        return cls(**{**{k: v for k, v in stored.items() if k in cls.__dataclass_fields__}, "cells": cells})

"""Designed studies: controlled comparisons around a baseline, a few seeds each, instead of an optimiser's draws.

To answer "does X change the score, and by how much?", an optimiser is the wrong tool: it spends
its trials where the score is high, not where the comparison is informative. A design varies one
factor at a time around the baseline, trains each cell with several seeds (genuine replicates),
and adds *arms*: the baseline trained longer (the epochs question), and other tasks reported
beside it (the notebook's MNIST CNN). A sweep YAML asks for one with a `design:` block:

    design:
      seeds: 3                          # first-round replicates of every cell
      baseline: {kernel: 3, width: 0.5, train.batch_size: 100}
      vary: {kernel: [2, 3, 4, 5, 6, 7], width: [0.25, 0.5, 1.0], train.batch_size: [32, 100, 256]}
      main: cifar10                     # the name of the baseline's task
      epochs: [2, 4]                    # the baseline also trained 2x and 4x longer
      arms: {mnist: [dataset=mnist, model=mnist_cnn]}

The baseline is shared by every comparison, so it gets about sqrt(k) times the seeds of the other
cells (k: the cells compared with it), the allocation that minimises the comparisons' variance.
Every cell is queued in the study with its values fixed (`study.enqueue_trial`); the searched
parameter `task` tells the arms apart.

With a constant learning rate and no early stopping, epoch e of a longer run is exactly a run of e
epochs, so one arm at the longest multiple answers every multiple from its learning curve (its
seeds start at `EPOCH_SEEDS`, so that its first epochs are never a copy of a baseline trial, and
its value at the baseline's epochs counts as a baseline replicate). With a schedule or early
stopping, curves of different lengths are not comparable: each multiple is a cell of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from cnnexp import PROJECT_ROOT
from cnnexp.config import anchor_paths
from cnnexp.errors import ConfigError

TASK = "task"
EPOCH_SEEDS = 1000  # seeds of the epochs arm start here: never the baseline's own seeds


@dataclass
class Design:
    seeds: int
    baseline: dict
    vary: dict[str, list]
    main: str
    arms: dict[str, list[str]]                     # every arm's own overrides (the epoch arms included)
    epochs: list[int] = field(default_factory=list)  # multiples of train.epochs the baseline is trained for
    epoch_arms: dict[str, int] = field(default_factory=dict)  # arm -> its epochs (set by `add_epoch_arms`)
    curve_arm: str | None = None                   # the one epoch arm whose curve answers every multiple
    base_epochs: int = 0                           # train.epochs of the main task's cells

    def add_epoch_arms(self, base_epochs: int, constant_schedule: bool, plus: set[str]) -> None:
        """The arms that train the baseline longer; `plus`: the baseline keys that need '+' (shortcuts)."""
        self.base_epochs = base_epochs
        multiples = sorted(m for m in self.epochs if m > 1)
        if not multiples:
            return
        baseline = [f"{'+' if key in plus else ''}{key}={value}" for key, value in self.baseline.items()]
        for multiple in ([multiples[-1]] if constant_schedule else multiples):
            name = f"epochs_x{multiple}"
            self.arms[name] = [*baseline, f"train.epochs={base_epochs * multiple}", f"train.seed={EPOCH_SEEDS}"]
            self.epoch_arms[name] = base_epochs * multiple
        self.curve_arm = f"epochs_x{multiples[-1]}" if constant_schedule else None

    def main_cells(self) -> list[dict]:
        """The baseline first, then one factor changed at a time."""
        base = {key: self.baseline[key] for key in self.vary}
        cells = [{TASK: self.main, **base}]
        for key, levels in self.vary.items():
            cells += [{TASK: self.main, **base, key: level} for level in levels if level != self.baseline[key]]
        return cells

    def cells(self) -> list[dict]:
        """Every configuration to train: the main task's cells, then the arms."""
        return self.main_cells() + [{TASK: arm} for arm in self.arms]

    def baseline_seeds(self) -> int:
        """The baseline's first-round replicates: about sqrt(k) times the others' (k: cells compared with it)."""
        k = max(1, len(self.main_cells()) - 1)
        return max(self.seeds, round(math.sqrt(k) * self.seeds))

    def first_round(self) -> list[tuple[dict, int]]:
        """(cell, replicates) of the first round."""
        cells = self.cells()
        return [(cells[0], self.baseline_seeds())] + [(cell, self.seeds) for cell in cells[1:]]

    def fixed(self) -> dict:
        """Baseline values that no question varies: plain overrides of the main task's trials."""
        return {key: value for key, value in self.baseline.items() if key not in self.vary}

    def expressions(self) -> dict[str, str]:
        """The search space the cells live in, in Hydra's grammar (for the study's distributions)."""
        space = {TASK: f"choice({','.join([self.main, *self.arms])})"}
        for key, levels in self.vary.items():
            space[key] = f"choice({','.join(str(v) for v in levels)})"
        return space

    def n_trials(self) -> int:
        return sum(count for _, count in self.first_round())

    def describe(self) -> dict:
        """What the report needs to know about the design (stored on the study)."""
        return {"main": self.main, "baseline": self.baseline, "vary": self.vary, "arms": list(self.arms),
                "seeds": self.seeds, "epoch_arms": self.epoch_arms, "curve_arm": self.curve_arm,
                "base_epochs": self.base_epochs}


def load_design(node: DictConfig | None) -> Design | None:
    """The `design:` block of a sweep YAML, checked; None when the sweep has none."""
    if node is None or not len(node):
        return None
    raw = OmegaConf.to_container(node, resolve=True)
    unknown = set(raw) - {"seeds", "baseline", "vary", "main", "arms", "epochs"}
    if unknown:
        raise ConfigError(f"design: unknown key(s) {sorted(unknown)}; use seeds, baseline, vary, main, epochs, arms.")
    seeds, baseline, vary = raw.get("seeds", 3), raw.get("baseline") or {}, raw.get("vary") or {}
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ConfigError(f"design.seeds={seeds!r} must be an integer >= 2: one seed can't measure noise.")
    for key, levels in vary.items():
        if key not in baseline:
            raise ConfigError(f"design.vary.{key}: give its baseline value in design.baseline.{key}.")
        if not isinstance(levels, list) or len(levels) < 2 or baseline[key] not in levels:
            raise ConfigError(f"design.vary.{key}={levels!r} must list at least 2 values, the baseline "
                              f"({baseline[key]!r}) among them.")
        if len(set(map(str, levels))) != len(levels):
            raise ConfigError(f"design.vary.{key}={levels!r} lists a value twice.")
    epochs = raw.get("epochs") or []
    if not isinstance(epochs, list) or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in epochs):
        raise ConfigError(f"design.epochs={epochs!r} must list whole multiples of train.epochs, e.g. [2, 4].")
    arms = {str(k): anchor_paths(list(v), PROJECT_ROOT) for k, v in (raw.get("arms") or {}).items()}
    main = str(raw.get("main", "main"))
    for name in [main, *arms]:
        if not name.replace("_", "").replace("-", "").isalnum() or name.startswith("epochs_x"):
            raise ConfigError(f"design: the task name {name!r} may hold letters, digits, '_' and '-' "
                              "(epochs_x* is reserved for the epochs arms).")
    return Design(seeds=seeds, baseline=baseline, vary=vary, main=main, arms=arms, epochs=epochs)

"""Designed studies: controlled comparisons around a baseline, a few seeds each, instead of an optimiser's draws.

To answer "does X change the score, and by how much?", an optimiser is the wrong tool: it spends
its trials where the score is high, not where the comparison is informative. A design varies one
factor at a time around the baseline (the baseline cell is shared by every question), trains each
cell with a few seeds (genuine replicates), and adds *arms*: other tasks compared with the
baseline (the notebook's MNIST CNN). A sweep YAML asks for one with a `design:` block:

    design:
      seeds: 3
      baseline: {kernel: 3, width: 0.5, train.batch_size: 100}
      vary: {kernel: [2, 3, 4, 5, 6, 7], width: [0.25, 0.5, 1.0], train.batch_size: [32, 100, 256]}
      main: cifar10                     # the name of the baseline's task
      arms: {mnist: [dataset=mnist, model=mnist_cnn]}

Every cell is queued in the study with its values fixed (`study.enqueue_trial`); the searched
parameter `task` tells the arms apart. Epochs are never a cell: every trial reports its learning
curve, and the epochs question is answered from those curves.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from cnnexp import PROJECT_ROOT
from cnnexp.config import anchor_paths
from cnnexp.errors import ConfigError

TASK = "task"


@dataclass
class Design:
    seeds: int
    baseline: dict
    vary: dict[str, list]
    main: str
    arms: dict[str, list[str]]

    def cells(self) -> list[dict]:
        """Every configuration to train: the baseline, one factor changed at a time, then the arms."""
        base = {key: self.baseline[key] for key in self.vary}
        cells = [{TASK: self.main, **base}]
        for key, levels in self.vary.items():
            for level in levels:
                if level != self.baseline[key]:
                    cells.append({TASK: self.main, **base, key: level})
        return cells + [{TASK: arm} for arm in self.arms]

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
        return len(self.cells()) * self.seeds


def load_design(node: DictConfig | None) -> Design | None:
    """The `design:` block of a sweep YAML, checked; None when the sweep has none."""
    if node is None or not len(node):
        return None
    raw = OmegaConf.to_container(node, resolve=True)
    unknown = set(raw) - {"seeds", "baseline", "vary", "main", "arms"}
    if unknown:
        raise ConfigError(f"design: unknown key(s) {sorted(unknown)}; use seeds, baseline, vary, main, arms.")
    seeds, baseline, vary = raw.get("seeds", 3), raw.get("baseline") or {}, raw.get("vary") or {}
    if not isinstance(seeds, int) or seeds < 2:
        raise ConfigError(f"design.seeds={seeds!r} must be an integer >= 2: one seed can't measure noise.")
    for key, levels in vary.items():
        if key not in baseline:
            raise ConfigError(f"design.vary.{key}: give its baseline value in design.baseline.{key}.")
        if not isinstance(levels, list) or len(levels) < 2 or baseline[key] not in levels:
            raise ConfigError(f"design.vary.{key}={levels!r} must list at least 2 values, the baseline "
                              f"({baseline[key]!r}) among them.")
    arms = {str(k): anchor_paths(list(v), PROJECT_ROOT) for k, v in (raw.get("arms") or {}).items()}
    return Design(seeds=seeds, baseline=baseline, vary=vary, main=str(raw.get("main", "main")), arms=arms)

"""Simulated studies with known truth, for checking that the verdicts are calibrated on the design we run.

`Simulator` draws runs of the study `make sweep` runs, image by image: every run is scored on the
same N evaluation images; image i is right with probability sigmoid(a_i + b_ci + shift_c + e_r),
where a_i is the image's difficulty, b_ci a fixed interaction of the configuration with the image
(so each configuration is luckier on *these* images by an offset that no number of seeds removes:
`offset_sd`, in accuracy points), shift_c its true effect and e_r the run's own deviation
(initialisation, data order, training subset). `sequential_study` runs the real rules on it: one
factor at a time around a baseline with more seeds, the long arm's runs counted as baseline
replicates, looks that spend the error rate, the allocation of later rounds. `curves` simulates
learning curves whose epochs are correlated within a run; `factorial_study` is a full grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import expit, logit

from cnnexp.design import TASK, Design, _questions, config_key
from cnnexp.stats.sequential import Cell, allocate, spend
from cnnexp.stats.settle import look

MAIN = "m"


def simulated_design(levels: dict[str, list], baseline: dict, seeds: int = 4) -> Design:
    design = Design(seeds=seeds, baseline=dict(baseline), vary={k: list(v) for k, v in levels.items()}, main=MAIN,
                    arms={})
    design.questions = _questions(design, {})
    return design


@dataclass
class Simulator:
    """Runs of a one-factor-at-a-time study, with their right/wrong on N shared evaluation images."""

    rng: np.random.Generator
    design: Design
    effects: dict[str, dict] = field(default_factory=dict)  # factor -> {value: true shift, in accuracy points}
    sigma: float = 0.016          # SD of a run's accuracy around its configuration's (binomial part included)
    offset_sd: float = 0.004      # SD of a configuration's fixed luck on the evaluation images
    images: int = 3000
    base: float = 0.45
    cell_sigma: dict = field(default_factory=dict)  # (factor, value) or "baseline" -> another sigma

    def __post_init__(self):
        self.difficulty = self.rng.normal(logit(self.base), 1.2, self.images)
        slope = expit(self.difficulty) * (1 - expit(self.difficulty))
        self.slope = float(slope.mean())
        binomial = float(np.mean(expit(self.difficulty) * (1 - expit(self.difficulty)))) / self.images
        self.run_sd = lambda sigma: np.sqrt(max(sigma ** 2 - binomial, 1e-12)) / self.slope
        self.tau = self.offset_sd * np.sqrt(self.images) / np.sqrt(float(np.mean(slope ** 2)))
        self.interaction: dict[str, np.ndarray] = {}
        self.next_seed = 0

    def _changed(self, cell: dict):
        return next(((f, v) for f, v in cell.items() if f != TASK and v != self.design.baseline[f]), None)

    def runs(self, cell: dict, n: int, **extra) -> pd.DataFrame:
        key = config_key(cell)
        if key not in self.interaction:
            self.interaction[key] = self.rng.normal(0.0, self.tau, self.images) if self.offset_sd else 0.0
        changed = self._changed(cell)
        shift = self.effects.get(changed[0], {}).get(changed[1], 0.0) if changed else 0.0
        sigma = self.cell_sigma.get(changed if changed else "baseline", self.sigma)
        rows = []
        for _ in range(n):
            logits = (self.difficulty + self.interaction[key] + shift / self.slope
                      + self.rng.normal(0, self.run_sd(sigma)))
            correct = self.rng.random(self.images) < expit(logits)
            rows.append({**{f: cell[f] for f in self.design.vary}, "seed": self.next_seed, "failed": False,
                         "cell": key, "objective": float(correct.mean()), "correct": correct, **extra})
            self.next_seed += 1
        return pd.DataFrame(rows)

    def first_round(self, arm_runs: int = 0) -> pd.DataFrame:
        """Every cell with its first seeds (the baseline with about sqrt(k) times as many), and the long arm's runs
        at the baseline's epochs (baseline replicates of their own)."""
        parts = [self.runs(cell, count) for cell, count in self.design.first_round()
                 if cell.get(TASK, self.design.main) == self.design.main]  # an arm of its own task is measured apart
        if arm_runs:
            parts.append(self.runs(self.design.baseline_cell(), arm_runs, from_epochs_arm=True))
        return pd.concat(parts, ignore_index=True)


def sequential_study(sim: Simulator, margin: float, looks: int = 4, alpha: float = 0.05, runs_per_round: int = 24,
                     arm_runs: int = 4) -> dict[str, str]:
    """A designed study settled in rounds, as `make sweep` runs it: each question's verdict over all its looks.

    Every look answers with its share of the error rate (`sequential.spend`); a question keeps the
    first settled verdict it reached; unsettled ones get `runs_per_round` more runs where
    `sequential.allocate` says (every run costs the same here).
    """
    table = sim.first_round(arm_runs)
    verdicts: dict[str, str] = {}
    for j in range(1, looks + 1):
        seen = look(table, {}, None, sim.design, spend(j, looks, alpha, final=j == looks), margin, set(verdicts))
        for name, answer in seen.factors.items():
            if name not in verdicts and answer.settled():
                verdicts[name] = answer.verdict
        needs = [need for need in seen.needs if need.question not in verdicts]
        if j == looks or not needs:
            break
        counts = table["cell"].value_counts()
        var = table.groupby("cell")["objective"].var().fillna(sim.sigma ** 2)
        cells = {c: Cell(int(counts[c]), float(var[c]), 1.0) for c in counts.index}
        add = allocate(needs, cells, float(runs_per_round))
        table = pd.concat([table, *(sim.runs(sim.design.cell(c), n) for c, n in add.items())], ignore_index=True)
    return {name: verdicts.get(name, "not_detected") for name in sim.design.vary}


def design_study(rng: np.random.Generator, levels: dict[str, list], baseline: dict, effects: dict[str, dict],
                 sigma: float, seeds: int, baseline_seeds: int | None = None, cell_sigma: dict | None = None,
                 outlier: tuple[str, object] | None = None, offset_sd: float = 0.0, images: int = 0) -> pd.DataFrame:
    """One round of a one-factor-at-a-time study (summary scores, or image by image with `images`).

    Without images, score = base + the changed factor's effect + N(0, sigma) per run (plus a fixed
    per-configuration offset of SD `offset_sd`, which no CI then covers); `outlier`: (factor, value)
    whose first run failed at chance level (0.10, `failed`).
    """
    design = simulated_design(levels, baseline, seeds)
    if images:
        sim = Simulator(rng, design, effects, sigma, offset_sd, images, cell_sigma=cell_sigma or {})
        return sim.first_round()
    rows = []
    for i, cell in enumerate(design.main_cells()):
        changed = next(((f, v) for f, v in cell.items() if f != TASK and v != baseline[f]), None)
        shift = effects.get(changed[0], {}).get(changed[1], 0.0) if changed else 0.0
        sd = (cell_sigma or {}).get(changed if changed else "baseline", sigma)
        offset = rng.normal(0, offset_sd) if offset_sd else 0.0
        count = (baseline_seeds or seeds) if i == 0 else seeds
        for _ in range(count):
            rows.append({**{f: cell[f] for f in levels}, "seed": len(rows), "objective": 0.45 + shift + offset
                         + rng.normal(0, sd), "failed": False, "cell": config_key(cell)})
        if outlier is not None and changed == outlier:
            rows[-count] |= {"objective": 0.10, "failed": True}
    return pd.DataFrame(rows)


def curves(rng: np.random.Generator, runs: int, epochs: int, shape, sigma: float, run_sd: float = 0.0,
           rho: float = 0.6) -> list[dict[int, float]]:
    """Learning curves: shape(epoch) + a run's own offset + AR(1) noise across its epochs (correlation rho)."""
    out = []
    for _ in range(runs):
        offset, noise, curve = rng.normal(0, run_sd), 0.0, {}
        for epoch in range(1, epochs + 1):
            noise = rho * noise + np.sqrt(1 - rho ** 2) * rng.normal(0, sigma)
            curve[epoch] = float(shape(epoch) + offset + noise)
        out.append(curve)
    return out


def factorial_study(rng: np.random.Generator, design: dict[str, list], effects: dict[str, dict], sigma: float,
                    replicates: int) -> pd.DataFrame:
    """A full grid: objective = 0.5 + sum of level effects + N(0, sigma), each combination `replicates` times."""
    rows = [dict(zip(design, combo)) for combo in itertools.product(*design.values()) for _ in range(replicates)]
    table = pd.DataFrame(rows, columns=list(design))
    table["seed"] = np.arange(len(table))
    shift = sum((table[p].map(lambda v, e=e: e.get(v, 0.0)).astype(float) for p, e in effects.items()),
                start=pd.Series(0.0, index=table.index))
    table["objective"] = 0.5 + shift + rng.normal(0.0, sigma, len(table))
    table["failed"] = False
    return table

"""Simulated studies with known truth, for checking that the verdicts are calibrated.

`design_study` simulates the study `make sweep` runs: one factor at a time around a baseline, the
baseline with more seeds, seeds shared across cells (blocks), a noise SD per cell, and optionally
a run that failed at chance level. `curves` simulates learning curves whose epochs are correlated
within a run. `factorial_study` is a full grid, as an optimiser's study might approach.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from cnnexp.stats.sequential import Cell, allocate, spend
from cnnexp.stats.settle import cell_key, look


def design_study(rng: np.random.Generator, levels: dict[str, list], baseline: dict, effects: dict[str, dict],
                 sigma: float, seeds: int, baseline_seeds: int | None = None, cell_sigma: dict | None = None,
                 block_sd: float = 0.0, outlier: tuple[str, object] | None = None, base: float = 0.45,
                 first_seed: dict | None = None) -> pd.DataFrame:
    """One factor at a time around `baseline`; score = base + the changed factor's effect + block + noise.

    Args:
        levels: factor -> its values (the baseline's among them).
        effects: factor -> {value: shift}; values not named shift by 0.
        sigma: the noise SD of every cell, unless `cell_sigma` names (factor, value) -> another SD.
        seeds, baseline_seeds: runs per cell, and of the baseline (default: seeds).
        block_sd: SD of the seed blocks: a run's seed shifts every cell that uses it alike.
        outlier: (factor, value) whose first run failed at chance level (0.10, `failed`).
        first_seed: cell key -> the seed its runs start from (later rounds continue a cell's seeds).
    """
    cells = [dict(baseline)] + [{**baseline, f: v} for f, values in levels.items() for v in values if v != baseline[f]]
    blocks = rng.normal(0.0, block_sd, 1000) if block_sd else np.zeros(1000)
    rows = []
    for i, cell in enumerate(cells):
        changed = next(((f, v) for f, v in cell.items() if v != baseline[f]), None)
        shift = effects.get(changed[0], {}).get(changed[1], 0.0) if changed else 0.0
        sd = (cell_sigma or {}).get(changed, sigma) if changed else (cell_sigma or {}).get("baseline", sigma)
        start = (first_seed or {}).get(cell_key(cell), 0)
        for seed in range(start, start + (baseline_seeds or seeds if i == 0 else seeds)):
            rows.append({**cell, "seed": seed, "objective": base + shift + blocks[seed] + rng.normal(0, sd),
                         "failed": False, "cell": cell_key(cell)})
        if outlier is not None and changed == outlier:
            rows[-seeds] |= {"objective": 0.10, "failed": True}
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


def sequential_study(rng: np.random.Generator, levels: dict[str, list], baseline: dict, effects: dict[str, dict],
                     sigma: float, seeds: int, baseline_seeds: int, precision: float, looks: int = 4,
                     alpha: float = 0.05, runs_per_round: int = 24) -> dict[str, str]:
    """A designed study settled in rounds, as `make sweep` runs it: each question's verdict over all its looks.

    Every look answers with its share of the error rate (`sequential.spend`); unsettled questions get
    `runs_per_round` more runs where `sequential.allocate` says (every run costs the same here); a
    question keeps the first settled verdict it reached.
    """

    design = {"baseline": baseline, "vary": levels, "base_epochs": 0}
    table = design_study(rng, levels, baseline, effects, sigma, seeds, baseline_seeds)
    verdicts: dict[str, str] = {}
    for j in range(1, looks + 1):
        seen = look(table, {}, None, design, spend(j, looks, alpha, final=j == looks), precision)
        for name, answer in seen.factors.items():
            if name not in verdicts and answer.settled():
                verdicts[name] = answer.verdict
        needs = [need for need in seen.needs if need.question not in verdicts]
        if j == looks or not needs:
            break
        counts = table["cell"].value_counts()
        var = table.groupby("cell")["objective"].var().fillna(sigma ** 2)
        cells = {c: Cell(int(counts[c]), float(var[c]), 1.0) for c in counts.index}
        add = allocate(needs, cells, float(runs_per_round))
        starts = {c: int(table.loc[table["cell"] == c, "seed"].max()) + 1 for c in add}
        for cell, n in add.items():
            values = dict(part.split("=") for part in cell.split(","))
            typed = {f: next(v for v in levels[f] if str(v) == values[f]) for f in levels}
            changed = next(((f, v) for f, v in typed.items() if v != baseline[f]), None)
            extra = design_study(rng, {f: [typed[f]] for f in levels}, typed, {}, sigma, n,
                                 first_seed={cell: starts[cell]})
            shift = effects.get(changed[0], {}).get(changed[1], 0.0) if changed else 0.0
            extra["objective"] += shift
            table = pd.concat([table, extra], ignore_index=True)
    return {name: verdicts.get(name, "not_detected") for name in levels}

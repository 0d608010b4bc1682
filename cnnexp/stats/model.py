"""The accuracy model behind every verdict: additive, with seed blocks, and a variance of its own per configuration.

    score = intercept + effect of each searched value (a level, or a slope) [+ seed block] + noise

- **Additive**: every parameter's effect is adjusted for the others (a sampler rarely balances them;
  in a one-factor-at-a-time design the model is exactly the cells' means).
- **Seed blocks**: `train.seed` seeds initialisation and data order; a seed used by several
  configurations enters as a block, so what it shares across them is not counted as noise.
  A seed used once carries no block information and is left out of the blocks.
- **A variance per configuration**, shrunk towards the common one (empirical Bayes, as limma
  moderates gene-wise variances) but never below the configuration's own estimate (then with its
  own degrees of freedom): one noisy configuration widens only its own comparisons, and a quiet
  one borrows the others' strength. Contrasts get a sandwich variance from these
  per-configuration variances, and Welch-Satterthwaite degrees of freedom.
- **The evaluation images** (where each run kept which of them it got right): every run of a study
  is scored on the same N images, so each configuration's luck on *those* images is shared by all
  its runs and would never shrink with more seeds. A contrast's variance gets the term
  Var_i(delta_i) / N, delta_i being the contrast of the configurations' mean correctness on image i
  (paired across images), less what the runs' own noise adds to Var_i (estimated per image from
  the runs of each configuration), with N - 1 degrees of freedom.

Pure numpy/scipy: fast enough for calibration on thousands of simulated studies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special


@dataclass
class Term:
    """One searched parameter's columns in the design matrix."""

    name: str
    kind: str                  # categorical | linear | log
    levels: list               # categorical: the values (the first is the reference); continuous: []
    columns: list[int]         # its columns in X


@dataclass
class Fit:
    """A fitted model: coefficients, and what each contrast's variance and degrees of freedom are made of."""

    beta: np.ndarray
    x: np.ndarray               # design matrix (rows: runs)
    y: np.ndarray
    xtx_inv: np.ndarray
    cells: np.ndarray           # per run: its configuration's index
    cell_var: np.ndarray        # per configuration: the moderated variance
    cell_df: np.ndarray         # per configuration: its degrees of freedom (own + prior, capped)
    residual_df: float
    prior_var: float            # the common variance the cells are shrunk towards
    prior_df: float             # how strongly (inf: all equal)
    terms: dict[str, Term]
    data: pd.DataFrame          # the runs the model was fitted on
    images: Images | None = None  # per configuration, its runs' right/wrong on the evaluation images

    def contrast(self, a: np.ndarray) -> tuple[float, float, float]:
        """(estimate, standard error, degrees of freedom) of a'beta, the evaluation images' term included."""
        g = self.x @ (self.xtx_inv @ a)                    # each run's weight in the estimate
        weights = np.bincount(self.cells, weights=g ** 2, minlength=len(self.cell_var))
        parts = weights * self.cell_var
        var = float(parts.sum())
        noise = float(np.sum(parts ** 2 / self.cell_df))
        if self.images is not None:
            term = self.images.variance(np.bincount(self.cells, weights=g, minlength=len(self.cell_var)))
            var, noise = var + term, noise + term ** 2 / max(self.images.count - 1, 1)
        df = var ** 2 / noise if var > 0 else float("inf")
        return float(a @ self.beta), math.sqrt(max(var, 0.0)), min(df, self.residual_df)

    def eval_share(self, a: np.ndarray) -> float:
        """The share of a contrast's variance that the evaluation images contribute (0 without their records)."""
        if self.images is None:
            return 0.0
        g = self.x @ (self.xtx_inv @ a)
        term = self.images.variance(np.bincount(self.cells, weights=g, minlength=len(self.cell_var)))
        total = float(np.sum(np.bincount(self.cells, weights=g ** 2, minlength=len(self.cell_var)) * self.cell_var))
        return term / (total + term) if total + term > 0 else 0.0


@dataclass
class Images:
    """Per configuration: its runs' mean right/wrong per evaluation image, the per-image variance over runs, runs."""

    means: np.ndarray          # (configurations, N)
    variances: np.ndarray      # (configurations, N), over runs (ddof 1)
    runs: np.ndarray           # (configurations,) runs that kept their images

    @property
    def count(self) -> int:
        return self.means.shape[1]

    def variance(self, w: np.ndarray) -> float:
        """Var over the images of sum_c w_c * mean_c (paired), less the runs' own noise in it, over N; >= 0.

        A configuration whose weight counts but that kept fewer than 2 runs' images gets no term: it
        can't be paired (the caller then has the seeds' variance alone)."""
        used = np.abs(w) > 1e-12
        if not used.any() or (self.runs[used] < 2).any():
            return 0.0
        delta = w[used] @ self.means[used]
        noise = ((w[used] ** 2 / self.runs[used])[:, None] * self.variances[used]).sum(axis=0).mean()
        return max(float(np.var(delta, ddof=1)) - float(noise), 0.0) / self.count


def images_of(correct: list, cells: np.ndarray, n_cells: int) -> Images | None:
    """Stack each configuration's runs' right/wrong vectors; None when no run kept them or their sizes differ."""
    kept = [(c, np.asarray(v, float)) for c, v in zip(cells, correct) if v is not None and len(v)]
    if not kept or len({len(v) for _, v in kept}) != 1:
        return None
    size = len(kept[0][1])
    means, variances, runs = np.zeros((n_cells, size)), np.zeros((n_cells, size)), np.zeros(n_cells)
    for c in range(n_cells):
        rows = np.array([v for cell, v in kept if cell == c])
        runs[c] = len(rows)
        if len(rows):
            means[c] = rows.mean(axis=0)
            variances[c] = rows.var(axis=0, ddof=1) if len(rows) > 1 else 0.0
    return Images(means, variances, runs)

    @property
    def sd(self) -> float:
        """The common noise SD (the prior the configurations are shrunk towards)."""
        return math.sqrt(self.prior_var)


def _terms(data: pd.DataFrame, params: list[str], kinds: dict[str, str]) -> tuple[list[np.ndarray], dict[str, Term]]:
    columns, terms, index = [np.ones(len(data))], {}, 1
    for p in params:
        values = data[p]
        if kinds.get(p, "categorical") == "categorical":
            levels = sorted(values.drop_duplicates().tolist(), key=lambda v: (isinstance(v, str), v))
            codes = pd.Index(levels, dtype=object).get_indexer(values.astype(object))
            cols = [(codes == i).astype(float) for i in range(1, len(levels))]
            terms[p] = Term(p, "categorical", levels, list(range(index, index + len(cols))))
        else:
            numbers = values.to_numpy(dtype=float)
            cols = [np.log10(numbers) if kinds[p] == "log" else numbers]
            terms[p] = Term(p, kinds[p], [], [index])
        columns += cols
        index += len(cols)
    return columns, terms


def _blocks(data: pd.DataFrame, cells: np.ndarray, seed_column: str | None) -> list[np.ndarray]:
    """Dummy columns of the seeds shared by at least two configurations (the first such seed is the reference)."""
    if seed_column is None or seed_column not in data:
        return []
    seeds = data[seed_column].to_numpy()
    shared = [s for s in pd.unique(seeds) if len(set(cells[seeds == s])) >= 2]
    return [(seeds == s).astype(float) for s in shared[1:]]


def _prior(variances: np.ndarray, dfs: np.ndarray) -> tuple[float, float]:
    """(s0^2, d0) of the scaled inverse chi-square the cells' variances are drawn from (limma's fitFDist)."""
    ok = (dfs > 0.5) & (variances > 0)
    if ok.sum() < 3:  # the spread of fewer variances says nothing of how they differ: pool them
        pooled = float(np.sum(variances * dfs) / np.sum(dfs)) if dfs.sum() > 0 else float("nan")
        return pooled, float("inf")
    d, s2 = dfs[ok], variances[ok]
    e = np.log(s2) - special.digamma(d / 2) + np.log(d / 2)
    excess = float(np.var(e, ddof=1) - np.mean(special.polygamma(1, d / 2)))
    if excess <= 0:
        d0 = float("inf")
        s0 = float(np.exp(np.mean(e)))
    else:
        d0 = 2 * _trigamma_inverse(excess)
        s0 = float(np.exp(np.mean(e) + special.digamma(d0 / 2) - np.log(d0 / 2)))
    pooled = float(np.sum(variances * dfs) / np.sum(dfs))
    return (pooled if math.isinf(d0) else s0), d0


def _trigamma_inverse(value: float) -> float:
    """x with trigamma(x) = value (Newton's method, as limma's trigammaInverse)."""
    x = 0.5 + 1 / value
    for _ in range(50):
        step = special.polygamma(1, x) * (1 - special.polygamma(1, x) / value) / special.polygamma(2, x)
        x += step
        if abs(step) / x < 1e-8:
            break
    return float(x)


def fit(data: pd.DataFrame, params: list[str], kinds: dict[str, str], metric: str = "objective",
        seed_column: str | None = "seed", correct_column: str = "correct") -> Fit | None:
    """Fit the model to the runs in `data` (one row each); None when it can't be fitted (confounded, too few runs).

    `correct_column`: each run's right/wrong per evaluation image (an array, or None), for the images' term.
    """
    config = data[params].astype(str).agg("|".join, axis=1) if params else pd.Series("", index=data.index)
    cells = pd.factorize(config)[0]
    columns, terms = _terms(data, params, kinds)
    columns += _blocks(data, cells, seed_column)
    x, y = np.column_stack(columns), data[metric].to_numpy(dtype=float)
    if np.linalg.matrix_rank(x) < x.shape[1] or len(y) <= x.shape[1]:
        return None
    xtx_inv = np.linalg.inv(x.T @ x)
    beta = xtx_inv @ x.T @ y
    residual = y - x @ beta
    leverage = np.einsum("ij,jk,ik->i", x, xtx_inv, x)
    n_cells = cells.max() + 1
    dfs = np.bincount(cells, weights=1 - leverage, minlength=n_cells)
    sums = np.bincount(cells, weights=residual ** 2, minlength=n_cells)
    variances = np.divide(sums, dfs, out=np.zeros(n_cells), where=dfs > 1e-9)
    residual_df = float(len(y) - x.shape[1])
    prior_var, prior_df = _prior(variances, dfs)
    if not math.isfinite(prior_var) or prior_var <= 0:
        prior_var = float(residual @ residual / residual_df)
    if math.isfinite(prior_df):
        moderated = (variances * dfs + prior_var * prior_df) / (dfs + prior_df)
    else:
        moderated = np.full(n_cells, prior_var)
    cell_df = np.minimum(dfs + (prior_df if math.isfinite(prior_df) else residual_df), residual_df)
    # Never below the configuration's own estimate: shrinking a noisy cell's variance down to the others'
    # would call its noise an effect (measured: 16% false effects with one cell 3x noisier, 3 seeds each).
    # (A cell of one or two runs has too few degrees of freedom for its own estimate to mean anything.)
    own = (variances > moderated) & (dfs >= 1.5)
    moderated, cell_df = np.where(own, variances, moderated), np.where(own, np.maximum(dfs, 1.0), cell_df)
    images = images_of(list(data[correct_column]), cells, n_cells) if correct_column in data else None
    return Fit(beta=beta, x=x, y=y, xtx_inv=xtx_inv, cells=cells, cell_var=np.maximum(moderated, 1e-12),
               cell_df=np.maximum(cell_df, 1.0), residual_df=residual_df, prior_var=prior_var, prior_df=prior_df,
               terms=terms, data=data, images=images)

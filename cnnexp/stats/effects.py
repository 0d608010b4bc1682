"""Does a searched value change the score, by how much, and is that settled? Typed answers, no text.

For a categorical parameter (declared by `choice(...)`), every pair of its values gets a
simultaneous CI (Games-Howell: the studentized range at each pair's own Welch degrees of freedom),
from the model's adjusted means (`cnnexp.stats.model`). The headline is best minus worst. For a
numeric one (`range`/`interval`), a slope (per unit, or per decade on a log scale).

Verdicts:
- `effect`: some pair's simultaneous CI excludes 0 (a slope's CI excludes 0);
- `equivalent`: every pair's CI lies within +-margin (`answers.margin`; for a slope, over the searched range);
- `not_detected`: neither; `bound` says how large a difference the data still allows, and `mde` the
  smallest effect this design detects with 80% power;
- `insufficient_data`: a value with fewer than 2 usable runs, or no residual degrees of freedom;
  `runs_needed` says how many more would settle that.

Runs that failed (diverged, or at chance level) are not scores of their configuration's accuracy:
they are counted as a failure rate per value and tested apart (`failures`); the model fits the rest.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from cnnexp.stats.model import Fit, fit

VERDICTS = ("effect", "equivalent", "not_detected", "insufficient_data")
POWER = 0.80


@dataclass
class Level:
    """One value of a parameter: its runs, failures, raw and model-adjusted means, its own SD."""

    value: object
    n: int                          # usable runs (what the contrasts use)
    failed: int = 0                 # runs that diverged or sat at chance level
    mean: float = float("nan")      # raw mean of the usable runs
    adjusted: float = float("nan")  # model-adjusted mean (other parameters and seed blocks held at their mix)
    sd: float = float("nan")        # raw SD of the usable runs
    se: float = float("nan")        # SE of the adjusted mean
    cell_n: int = 0                 # in a design: the usable runs of the value's own cell (the contrast's n)


@dataclass
class Answer:
    """The answer for one parameter. Numbers are in the metric's units (accuracy: 0.01 = 1 point)."""

    parameter: str
    kind: str                        # categorical | linear | log
    verdict: str
    estimate: float = float("nan")   # best minus worst adjusted mean; or the slope
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    alpha: float = 0.05              # the error rate the CI holds at (after any spending over looks)
    best: object = None
    worst: object = None
    bound: float = float("nan")      # no two values differ by more than this (simultaneous)
    mde: float = float("nan")        # detectable with 80% power at this n
    p_value: float = float("nan")
    levels: list[Level] = field(default_factory=list)
    runs_needed: int = 0             # insufficient_data: more runs that would make it answerable
    why: str = ""                    # insufficient_data: what is missing
    pairs: list[tuple] = field(default_factory=list)  # (a, b, estimate, low, high) of every pair
    decisive: list[tuple] = field(default_factory=list)  # (higher, lower, estimate, low, high): CIs that exclude 0
    pair: tuple | None = None        # the pair `estimate` and its CI are of: (higher, lower)
    failing: list[Level] = field(default_factory=list)  # values whose runs failed too often to have an accuracy
    failure_p: float = float("nan")  # "the failure rate is the same at every value" (exact, see `failures`)
    failure_alpha: float = float("nan")  # the share of alpha the failure test spent (the accuracy CIs the rest)

    def settled(self) -> bool:
        return self.verdict in ("effect", "equivalent")


DF_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 60, 120, 10_000)


@functools.lru_cache(maxsize=256)
def _range_table(alpha: float, k: int) -> np.ndarray:
    """Studentized-range quantiles at DF_GRID (each ppf integrates numerically: ~0.1 s)."""
    return np.array([float(stats.studentized_range.ppf(1 - alpha, k, df)) for df in DF_GRID])


def critical(alpha: float, k: int, df: float) -> float:
    """Simultaneous critical value, in SEs of a difference, for all pairs of k values (studentized range / sqrt 2).

    For k > 2 the quantile is interpolated linearly in 1/df between tabulated degrees of freedom (the
    classic way tables are read; error < 0.5% here), so that thousands of simulated studies stay fast.
    """
    df = max(1.0, df) if math.isfinite(df) else 10_000.0
    if k <= 2:
        return float(stats.t.ppf(1 - alpha / 2, df))
    grid = 1.0 / np.array(DF_GRID, dtype=float)
    return float(np.interp(1.0 / df, grid[::-1], _range_table(round(alpha, 10), k)[::-1])) / math.sqrt(2)


def mde(crit: float, df: float, se: float) -> float:
    """The smallest true difference found with probability POWER: it must clear the critical value by t_POWER SEs."""
    return (crit + float(stats.t.ppf(POWER, max(df, 1.0)))) * se


def _level_vector(fitted: Fit, param: str, index: int) -> np.ndarray:
    """The contrast vector of a level's adjusted mean: the mean fit with every run set to that level."""
    term = fitted.terms[param]
    a = fitted.x.mean(axis=0).copy()
    a[term.columns] = 0.0
    if index:
        a[term.columns[index - 1]] = 1.0
    return a


def _categorical(fitted: Fit, param: str, levels: list[Level], alpha: float, margin: float | None) -> Answer:
    term = fitted.terms[param]
    k = len(term.levels)
    vectors = [_level_vector(fitted, param, i) for i in range(k)]
    for i, level in enumerate(levels):
        level.adjusted, level.se, _ = fitted.contrast(vectors[i])
    pairs, rows = [], []
    for i, j in itertools.combinations(range(k), 2):
        estimate, se, df = fitted.contrast(vectors[i] - vectors[j])
        crit = critical(alpha, k, df)
        pairs.append((term.levels[i], term.levels[j], estimate, estimate - crit * se, estimate + crit * se))
        rows.append((estimate, se, df, crit))
    best = int(np.argmax([lv.adjusted for lv in levels]))
    worst = int(np.argmin([lv.adjusted for lv in levels]))
    oriented = [_higher_first(p) for p in pairs]
    decisive = sorted((p for p in oriented if p[3] > 0), key=lambda p: -p[2])
    # The headline: an effect's largest pair whose CI excludes 0 (the words name it), else best minus worst.
    reported = decisive[0] if decisive else next(p for p in oriented if {p[0], p[1]} == {term.levels[best],
                                                                                           term.levels[worst]})
    bound = max(max(abs(lo), abs(hi)) for _, _, _, lo, hi in pairs)
    equivalent = margin is not None and bound < margin
    # Bonferroni over the k(k-1)/2 pairs: a conservative p-value, cheap enough for thousands of simulated studies.
    p_value = min(1.0, len(pairs) * min(float(2 * stats.t.sf(abs(e) / s, max(d, 1.0))) if s > 0 else 0.0
                                        for e, s, d, _ in rows))
    return Answer(param, "categorical", "effect" if decisive else ("equivalent" if equivalent else "not_detected"),
                  estimate=reported[2], ci_low=reported[3], ci_high=reported[4], alpha=alpha,
                  best=term.levels[best], worst=term.levels[worst], bound=bound,
                  mde=max(mde(c, d, s) for _, s, d, c in rows), p_value=p_value, levels=levels, pairs=pairs,
                  decisive=decisive, pair=(reported[0], reported[1]))


def _higher_first(pair: tuple) -> tuple:
    """(a, b, a - b, low, high) turned so that the first value scores higher: (higher, lower, >= 0, low, high)."""
    a, b, estimate, low, high = pair
    return (a, b, estimate, low, high) if estimate >= 0 else (b, a, -estimate, -high, -low)


def _slope(fitted: Fit, param: str, levels: list[Level], alpha: float, margin: float | None) -> Answer:
    term = fitted.terms[param]
    a = np.zeros(len(fitted.beta))
    a[term.columns[0]] = 1.0
    slope, se, df = fitted.contrast(a)
    crit = float(stats.t.ppf(1 - alpha / 2, max(df, 1.0)))
    low, high = slope - crit * se, slope + crit * se
    values = fitted.data[param].to_numpy(dtype=float)
    scaled = np.log10(values) if term.kind == "log" else values
    span = float(scaled.max() - scaled.min())
    bound = max(abs(low), abs(high)) * span  # the largest change over the searched range the data allows
    verdict = "effect" if low > 0 or high < 0 else (
        "equivalent" if margin is not None and bound < margin else "not_detected")
    best = values.max() if slope >= 0 else values.min()
    t_value = abs(slope) / se if se > 0 else float("inf")
    return Answer(param, term.kind, verdict, estimate=slope, ci_low=low, ci_high=high, alpha=alpha,
                  best=_plain(best), worst=_plain(values.min() if slope >= 0 else values.max()), bound=bound,
                  mde=mde(crit, df, se), p_value=float(2 * stats.t.sf(t_value, max(df, 1.0))), levels=levels)


def _plain(value):
    value = value.item() if isinstance(value, np.generic) else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _levels(table: pd.DataFrame, usable: pd.Series, param: str, metric: str) -> list[Level]:
    out = []
    values = sorted(table[param].dropna().drop_duplicates().tolist(), key=lambda v: (isinstance(v, str), v))
    for value in values:
        rows = table[param] == value
        scores = table.loc[rows & usable, metric].astype(float)
        out.append(Level(_plain(value), n=len(scores), failed=int((rows & ~usable).sum()),
                         mean=float(scores.mean()) if len(scores) else float("nan"),
                         sd=float(scores.std(ddof=1)) if len(scores) > 1 else float("nan")))
    return out


def factor_answers(table: pd.DataFrame, params: list[str], kinds: dict[str, str], metric: str = "objective",
                   alpha: float = 0.05, margin: float | None = None, failed_column: str | None = "failed",
                   seed_column: str | None = "seed") -> list[Answer]:
    """One `Answer` per parameter in `params`, from one model over the usable runs of `table`.

    Args:
        table: one row per finished run: the parameters, `metric`, and optionally `seed` and `failed`.
        kinds: parameter -> categorical | linear | log (what its search expression declared).
        alpha: the error rate of every CI (simultaneous over a parameter's values).
        margin: what `equivalent` means (None: that verdict is never given).
    """
    failed = table[failed_column].fillna(False).astype(bool) if failed_column in table else \
        pd.Series(False, index=table.index)
    table = table[table[metric].notna() | failed] if metric in table else table.iloc[:0]
    usable = ~failed.loc[table.index]
    varying = [p for p in params if p in table and table.loc[usable, p].nunique() > 1]
    data = table[usable].dropna(subset=varying)
    fitted = fit(data, varying, kinds, metric, seed_column) if len(data) else None
    out = []
    for p in params:
        levels = _levels(table, usable, p, metric) if p in table else []
        thin = [lv for lv in levels if lv.n < 2]
        categorical = kinds.get(p, "categorical") == "categorical"
        # Where runs failed, a failure test and the accuracy CIs answer the same question: they split its alpha.
        share = alpha / 2 if categorical and any(lv.failed for lv in levels) else alpha
        if categorical and thin and p in varying and fitted is not None and _answered_by_failures(fitted, p, levels):
            out.append(_with_failures(fitted, p, levels, share, margin))
        elif p not in varying or fitted is None or (categorical and thin):
            out.append(_insufficient(p, kinds.get(p, "categorical"), levels, thin, fitted, len(data), len(varying)))
        elif categorical:
            answer = _categorical(fitted, p, levels, share, margin)
            out.append(_failure_test(answer, levels, share) if share < alpha else answer)
        else:
            out.append(_slope(fitted, p, levels, alpha, margin))
    return out


def _failure_test(answer: Answer, levels: list[Level], share: float) -> Answer:
    """Runs failed at some value: their rate per value is tested too, at its share of the question's alpha."""
    answer.failure_p, answer.failure_alpha = failures(levels), share
    if answer.failure_p < share:
        answer.verdict = "effect"
    return answer


def _answered_by_failures(fitted: Fit, p: str, levels: list[Level]) -> bool:
    """Values left without an accuracy because their runs failed (none trained) are answered by their failure rate,
    the values that trained by their accuracy: a learning rate that diverges is an answer, not missing data."""
    trained = [lv for lv in levels if lv.n >= 2]
    failing = [lv for lv in levels if lv.n < 2]
    return (len(trained) >= 2 and all(lv.n == 0 and lv.failed > 0 for lv in failing)
            and list(fitted.terms[p].levels) == [lv.value for lv in trained])


def _with_failures(fitted: Fit, p: str, levels: list[Level], alpha: float, margin: float | None) -> Answer:
    trained = [lv for lv in levels if lv.n >= 2]
    answer = _categorical(fitted, p, trained, alpha, margin)
    answer.failing, answer.failure_p, answer.failure_alpha = [lv for lv in levels if lv.n < 2], failures(levels), alpha
    if answer.failure_p < alpha:  # the value changes the outcome: its runs fail
        answer.verdict = "effect"
    elif answer.verdict == "equivalent":  # values without an accuracy can't be called equivalent to the others
        answer.verdict = "not_detected"
    answer.p_value = min(answer.p_value, answer.failure_p)
    return answer


def _insufficient(p: str, kind: str, levels: list[Level], thin: list[Level], fitted: Fit | None, runs: int,
                  n_varying: int) -> Answer:
    if len(levels) < 2:
        return Answer(p, kind, "insufficient_data", levels=levels, runs_needed=2,
                      why=(f"only {p}={levels[0].value} was tried: try at least 2 values" if levels
                           else "no usable runs"))
    if thin:
        needed = sum(2 - lv.n for lv in thin)
        at = ", ".join(f"{p}={lv.value}" for lv in thin)
        return Answer(p, kind, "insufficient_data", levels=levels, runs_needed=needed,
                      why=f"{needed} more run{'s' * (needed > 1)} at {at}")
    needed = max(1, 2 + n_varying - runs) if fitted is None else 1
    return Answer(p, kind, "insufficient_data", levels=levels, runs_needed=needed,
                  why="the parameters are confounded in these runs, or too few for their noise: vary them "
                      "independently (a grid or a design) or add runs")


def failures(levels: list[Level]) -> float:
    """p-value of "the failure rate is the same at every value": Fisher's exact test of each value against the rest,
    Bonferroni over the values (exact, so a single failed run among few is never called a different rate)."""
    table = np.array([[lv.failed, lv.n] for lv in levels if lv.failed + lv.n > 0])
    if len(table) < 2 or table[:, 0].sum() == 0:
        return 1.0
    if len(table) == 2:
        return float(stats.fisher_exact(table)[1])
    total = table.sum(axis=0)
    return min(1.0, len(table) * min(float(stats.fisher_exact([row, total - row])[1]) for row in table))

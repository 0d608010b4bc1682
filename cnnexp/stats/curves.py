"""Answers read off learning curves: the best epoch, longer training, and comparisons at equal updates or time.

A curve is one run's validation score after each epoch (from 1). With a constant learning rate
and no early stopping, epoch e of a longer run is exactly a run of e epochs, so one set of long
runs answers every shorter length; curves of other runs can be read at any number of updates
(epochs x steps per epoch) or seconds by linear interpolation between their epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    n: int
    alpha: float = 0.05

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass
class EpochsAnswer:
    """How long to train: the mean curve, the best epoch with its range, and what training longer changes."""

    verdict: str                          # effect | equivalent | not_detected | insufficient_data
    best_epoch: int | None = None
    plateau: tuple[int, int] | None = None  # epochs whose score is within noise of the best (simultaneous)
    at_or_beyond: bool = False            # the best may lie past the last epoch trained
    overfits: Interval | None = None      # last epoch minus best epoch, when the curve falls again
    gain: Interval | None = None          # last epoch minus the base epochs (paired by run): the verdict's contrast
    base_epochs: int | None = None
    last_epoch: int | None = None
    mean: list[Interval] = field(default_factory=list)  # per epoch, from 1
    runs: int = 0
    why: str = ""


def mean_interval(values, alpha: float = 0.05) -> Interval:
    """Mean with a t interval (runs are the replicates)."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(values) < 2:
        mean = float(values.mean()) if len(values) else float("nan")
        return Interval(mean, float("nan"), float("nan"), len(values), alpha)
    low, high = stats.t.interval(1 - alpha, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    if not math.isfinite(low):  # no spread at all
        low = high = float(values.mean())
    return Interval(float(values.mean()), float(low), float(high), len(values), alpha)


def welch(a, b, alpha: float = 0.05) -> Interval:
    """mean(a) - mean(b) with Welch's t interval."""
    a, b = (np.asarray([v for v in x if v is not None and math.isfinite(v)], dtype=float) for x in (a, b))
    estimate = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if min(len(a), len(b)) < 2:
        return Interval(estimate, float("nan"), float("nan"), min(len(a), len(b)), alpha)
    with np.errstate(all="ignore"):
        result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(1 - alpha)
    if not math.isfinite(ci.low):
        return Interval(estimate, estimate, estimate, min(len(a), len(b)), alpha)
    return Interval(estimate, float(ci.low), float(ci.high), min(len(a), len(b)), alpha)


def epochs_answer(curves: list[dict[int, float]], base_epochs: int, alpha: float = 0.05,
                  margin: float | None = None) -> EpochsAnswer:
    """The epochs question from complete runs' curves (each {epoch: score}, all of the same length).

    The best epoch is the mean curve's peak; its range holds every epoch not worse than the peak by
    a paired, Bonferroni-simultaneous CI. The verdict compares the last epoch with `base_epochs`
    (what the other questions train), paired by run.
    """
    last = min((max(c) for c in curves if c), default=0)
    grid = np.array([[c.get(e, np.nan) for e in range(1, last + 1)] for c in curves if c], dtype=float)
    if len(grid) < 2 or last < 2 or np.isnan(grid).any():
        return EpochsAnswer("insufficient_data", runs=len(grid),
                            why="at least 2 complete runs with a learning curve of at least 2 epochs")
    means = [mean_interval(grid[:, e], alpha) for e in range(last)]
    peak = int(np.argmax(grid.mean(axis=0)))
    plateau = [e for e in range(last) if e == peak or
               _paired(grid[:, e] - grid[:, peak], alpha / max(1, last - 1)).high >= 0]
    answer = EpochsAnswer("not_detected", best_epoch=peak + 1, plateau=(min(plateau) + 1, max(plateau) + 1),
                          at_or_beyond=max(plateau) == last - 1, mean=means, runs=len(grid), base_epochs=base_epochs,
                          last_epoch=last)
    drop = _paired(grid[:, last - 1] - grid[:, peak], alpha)
    if peak < last - 1 and drop.high < 0:
        answer.overfits = drop
    if base_epochs < last:
        answer.gain = _paired(grid[:, last - 1] - grid[:, base_epochs - 1], alpha)
        if answer.gain.low > 0 or answer.gain.high < 0:
            answer.verdict = "effect"
        elif margin is not None and max(abs(answer.gain.low), abs(answer.gain.high)) < margin:
            answer.verdict = "equivalent"
    return answer


def _paired(differences: np.ndarray, alpha: float) -> Interval:
    return mean_interval(differences, alpha)


def value_at(curve: dict[int, float], position: float, scale: list[float] | None = None,
             log: bool = False) -> float | None:
    """The score of a curve at `position` epochs (or, with `scale`, at that much of the cumulative quantity per epoch).

    `scale` gives the cumulative updates or seconds after each epoch; positions between two epochs
    are interpolated, linearly or (`log`) linearly in the logarithm of the position: a learning curve
    is concave in updates, nearly straight in their logarithm, so a straight line between two epochs
    would read it too low. A position before the first epoch or past the last is None (never
    extrapolated).
    """
    epochs = sorted(curve)
    xs = np.array(scale if scale is not None else epochs, dtype=float)[: len(epochs)]
    if len(xs) < len(epochs) or position < xs[0] - 1e-9 or position > xs[-1] + 1e-9:
        return None
    if log and xs[0] > 0 and position > 0:
        return float(np.interp(np.log(position), np.log(xs), [curve[e] for e in epochs]))
    return float(np.interp(position, xs, [curve[e] for e in epochs]))


@dataclass
class AtEqual:
    """A cell compared with the reference runs' curves read at the cell's own updates or seconds."""

    level: object
    axis: str                # updates | seconds
    at: float                # how many updates / seconds
    difference: Interval | None = None  # cell minus reference, Welch
    why: str = ""            # why there is no comparison (the reference's curves don't reach that far)


def at_equal(cell_values: list[float], at: float, reference: list[dict[int, float]], scales: list[list[float]],
             level, axis: str, alpha: float = 0.05) -> AtEqual:
    """Compare a cell's final scores with the reference runs read at `at` updates or seconds."""
    read = [value_at(curve, at, scale, log=axis in ("updates", "images")) for curve, scale in zip(reference, scales)]
    if any(v is None for v in read) or not read:
        reach = max((s[-1] for s in scales if s), default=0)
        return AtEqual(level, axis, at, why=f"the reference runs reach {reach:,.0f} {axis}, not {at:,.0f}")
    return AtEqual(level, axis, at, welch(cell_values, read, alpha))

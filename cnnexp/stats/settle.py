"""One look at a designed study's questions: each one's answer at this look's error rate, and what is undecided.

The questions of a design (`cnnexp.study.design`):
- each varied factor (kernel, width, batch size, ...): its values, the baseline's among them, compared
  in the main task's model (`cnnexp.stats.effects`);
- the epochs question: the curve of the baseline trained longer (`cnnexp.stats.curves`);
- every other arm (the MNIST CNN): what it reaches, measured, never compared with another task.

A question is settled when its verdict is `effect` or `equivalent` (a measured arm: when its CI is
narrower than +-precision). `needs` names, for the rest, the cells whose runs would settle them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from cnnexp.record import TrialRecord
from cnnexp.stats.curves import EpochsAnswer, Interval, epochs_answer, mean_interval
from cnnexp.stats.effects import Answer, answers
from cnnexp.stats.sequential import Need

MEASURED = "measured"


@dataclass
class Look:
    alpha: float
    factors: dict[str, Answer] = field(default_factory=dict)
    epochs: EpochsAnswer | None = None
    measured: dict[str, Interval] = field(default_factory=dict)   # arm -> its test accuracy
    needs: list[Need] = field(default_factory=list)

    def verdicts(self) -> dict[str, str]:
        out = {name: a.verdict for name, a in self.factors.items()}
        if self.epochs is not None:
            out["train.epochs"] = self.epochs.verdict
        out.update({f"task={arm}": MEASURED for arm in self.measured})
        return out


def cell_key(values: dict) -> str:
    """A cell's name: its values in key order (`task=cifar10,kernel=5`)."""
    return ",".join(f"{k}={values[k]}" for k in sorted(values))


def look(main: pd.DataFrame, measured: dict[str, pd.DataFrame], curve_runs: pd.DataFrame | None, design: dict,
         alpha: float, precision: float) -> Look:
    """Answer every question at error rate `alpha`.

    Args:
        main: the main task's runs: factor columns, `objective`, `seed`, `failed`, `cell` (see `tables`).
        measured: arm -> its runs (`test_accuracy`, `failed`, `cell`).
        curve_runs: the epochs arm's runs (`curve`: {epoch: score}, `failed`, `cell`), or None.
        design: the design's description (`Design.describe`): its factors, baseline and base epochs.
    """
    result = Look(alpha)
    factors = {f: design["baseline"][f] for f in design["vary"]}
    base_epochs = int(design["base_epochs"])
    kinds = {f: "categorical" for f in factors}
    baseline_cell = None
    if len(main):
        at_baseline = main[[f for f in factors]].eq(pd.Series(factors)).all(axis=1)
        baseline_cell = main.loc[at_baseline, "cell"].iloc[0] if at_baseline.any() else None
    for answer in answers(main, list(factors), kinds, alpha=alpha, precision=precision):
        result.factors[answer.parameter] = answer
        if not answer.settled():
            result.needs.append(Need(answer.parameter, _factor_pairs(main, answer, baseline_cell)))
    for arm, runs in measured.items():
        usable = runs[~runs["failed"].fillna(False).astype(bool)] if "failed" in runs else runs
        interval = mean_interval(usable["test_accuracy"].tolist(), alpha)
        result.measured[arm] = interval
        if len(runs) and not interval.half_width <= precision:
            result.needs.append(Need(f"task={arm}", [(runs["cell"].iloc[0], None)]))
    if curve_runs is not None and len(curve_runs):
        usable = curve_runs[~curve_runs["failed"].fillna(False).astype(bool)]
        result.epochs = epochs_answer(list(usable["curve"]), base_epochs, alpha, precision)
        if result.epochs.verdict not in ("effect", "equivalent"):
            result.needs.append(Need("train.epochs", [(curve_runs["cell"].iloc[0], None)]))
    return result


def _factor_pairs(main: pd.DataFrame, answer: Answer, baseline_cell: str | None) -> list[tuple[str, str | None]]:
    """The cells of the contrasts that decide a factor: best vs worst, and the pair with the widest bound."""
    def cell_of(value) -> str | None:
        rows = main[main[answer.parameter] == value]
        if not len(rows):
            return None
        cells = rows["cell"].value_counts()
        return baseline_cell if baseline_cell in cells.index else cells.index[0]

    if answer.verdict == "insufficient_data":  # the thin values first
        return [(cell_of(level.value), None) for level in answer.levels if level.n < 2 and cell_of(level.value)]
    pairs = {(answer.best, answer.worst)}
    if answer.pairs:
        widest = max(answer.pairs, key=lambda p: max(abs(p[3]), abs(p[4])))
        pairs.add((widest[0], widest[1]))
    return [(cell_of(a), cell_of(b)) for a, b in pairs if cell_of(a) and cell_of(b)]


def tables(records: list[TrialRecord], design: dict, up_to_round: int | None = None
           ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], pd.DataFrame | None]:
    """The runs of a designed study, as `look` takes them: (main task, measured arms, epochs arm).

    Only complete runs count (of rounds up to `up_to_round`). A run flagged as diverged or at chance
    level is `failed`. The epochs arm's runs, read at the baseline's epochs, are replicates of the
    baseline too (a constant learning rate makes epoch e of a longer run a run of e epochs), with
    seeds of their own.
    """
    main, base_epochs = design["main"], int(design.get("base_epochs") or 0)
    factors, curve_arm = design["vary"], design.get("curve_arm")
    done = [r for r in records if (r.complete or r.failed_outcome) and (up_to_round is None or r.round <= up_to_round)]
    rows, measured, curve = [], {}, []
    for r in done:
        task = r.params.get("task")
        common = {"trial": r.number, "seed": r.seed, "failed": r.failed_outcome, "cell": cell_key(r.params),
                  "test_accuracy": r.test_accuracy, "seconds": r.duration_s}
        if task == main:
            rows.append({**{f: r.params.get(f) for f in factors}, **common, "objective": r.value})
        elif task == curve_arm and r.complete:
            curve.append({**common, "curve": r.curve})
            at_base = r.value_at(base_epochs) if base_epochs else None
            if at_base is not None:
                baseline = {f: design["baseline"][f] for f in factors}
                rows.append({**baseline, **common, "cell": cell_key({"task": main, **baseline}), "objective": at_base,
                             "from_epochs_arm": True})
        elif task in design.get("arms", []) and task not in design.get("epoch_arms", {}):
            measured.setdefault(task, []).append(common)
    columns = [*factors, "trial", "seed", "failed", "cell", "test_accuracy", "seconds", "objective"]
    return (pd.DataFrame(rows).reindex(columns=[*columns, "from_epochs_arm"]) if rows else pd.DataFrame(columns=columns),
            {arm: pd.DataFrame(runs) for arm, runs in measured.items()},
            pd.DataFrame(curve) if curve_arm else None)

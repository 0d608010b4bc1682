"""One look at a designed study's questions: each one's answer at this look's error rate, and what is undecided.

The questions are the design's (`cnnexp.design.Question`):
- a factor: its values, the baseline's among them, compared in the main task's model
  (`cnnexp.stats.effects`), and with `compare_at` also against the long curve at equal updates or
  seconds (`cnnexp.stats.curves.at_equal`);
- the curve (`train.epochs`): the baseline trained longer (`cnnexp.stats.curves`);
- an arm (the MNIST CNN): what it reaches, measured, never compared with another task.

A question is settled when its verdict is `effect` or `equivalent` (a measured arm: when its CI is
narrower than +-margin). `needs` names, for the rest, the cells whose runs would settle them. A
`Look` is a value that the sweep records on the study (`to_dict`) and the report reads back
(`from_dict`): the report never decides again what a look decided.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pandas as pd

from cnnexp.design import ARM, CURVE, FACTOR, TASK, Design, config_key
from cnnexp.stats.curves import AtEqual, EpochsAnswer, Interval, at_equal, epochs_answer, mean_interval, welch
from cnnexp.stats.effects import Answer, Level, factor_answers
from cnnexp.stats.sequential import Need

MEASURED = "measured"
SETTLED = ("effect", "equivalent", MEASURED)


@dataclass
class Look:
    alpha: float
    factors: dict[str, Answer] = field(default_factory=dict)
    epochs: EpochsAnswer | None = None
    measured: dict[str, Interval] = field(default_factory=dict)   # arm -> its test accuracy
    at_equal: dict[str, list[AtEqual]] = field(default_factory=dict)  # factor -> its values against the long curve
    needs: list[Need] = field(default_factory=list)

    def verdicts(self) -> dict[str, str]:
        """Question key -> verdict (an arm: `measured` once its CI is narrow enough, else `not_detected`)."""
        out = {name: a.verdict for name, a in self.factors.items()}
        if self.epochs is not None:
            out["train.epochs"] = self.epochs.verdict
        undecided = {need.question for need in self.needs}
        out.update({arm: "not_detected" if arm in undecided else MEASURED for arm in self.measured})
        return out

    def effect_pairs(self, design: Design) -> dict[str, list[tuple[str, str]]]:
        """Per factor called `effect`: the cells of its deciding pair and of its best value against the baseline
        (higher first), the contrasts a confirmation at a higher fidelity re-runs."""
        out = {}
        for key, answer in self.factors.items():
            if answer.verdict != "effect" or answer.pair is None:
                continue
            pairs = [answer.pair]
            base = design.baseline[key]
            if answer.best != base and {answer.best, base} != set(answer.pair):
                pairs.append((answer.best, base))
            out[key] = [(_cell(design, key, a), _cell(design, key, b)) for a, b in dict.fromkeys(pairs)]
        return out

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, stored: dict) -> Look:
        return cls(alpha=float(stored["alpha"]),
                   factors={k: _answer(v) for k, v in (stored.get("factors") or {}).items()},
                   epochs=_epochs(stored["epochs"]) if stored.get("epochs") else None,
                   measured={k: Interval(**v) for k, v in (stored.get("measured") or {}).items()},
                   at_equal={k: [_at_equal(a) for a in v] for k, v in (stored.get("at_equal") or {}).items()},
                   needs=[Need(n["question"], [tuple(p) for p in n["pairs"]]) for n in stored.get("needs") or []])


def look(main: pd.DataFrame, measured: dict[str, pd.DataFrame], curve_runs: pd.DataFrame | None, design: Design,
         alpha: float, margin: float, done: set[str] = frozenset()) -> Look:
    """Answer every question at error rate `alpha`.

    Args:
        main: the main task's runs: factor columns, `objective`, `seed`, `failed`, `cell` (`design.tables`).
        measured: arm -> its runs (`test_accuracy`, `failed`, `cell`).
        curve_runs: the long curve's runs (`curve`: {epoch: score}, `failed`, `cell`), or None.
        done: questions an earlier look settled: answered again for the record, but never undecided.
    """
    result = Look(alpha)
    factors = [q.key for q in design.questions.values() if q.kind == FACTOR]
    baseline_cell = _baseline_cell(main, design)
    for answer in factor_answers(main, factors, {f: "categorical" for f in factors}, alpha=alpha, margin=margin):
        _own_cells(answer, main, design)
        result.factors[answer.parameter] = answer
        if not answer.settled() and answer.parameter not in done:
            result.needs.append(Need(answer.parameter, _factor_pairs(main, answer, baseline_cell)))
    for question in design.questions.values():
        if question.kind == ARM and question.key in measured:
            runs = measured[question.key]
            usable = runs[~runs["failed"].fillna(False).astype(bool)] if "failed" in runs else runs
            interval = mean_interval(usable["test_accuracy"].tolist(), alpha)
            result.measured[question.key] = interval
            if len(runs) and not interval.half_width <= margin and question.key not in done:
                result.needs.append(Need(question.key, [(runs["cell"].iloc[0], None)]))
        elif question.kind == CURVE and curve_runs is not None and len(curve_runs):
            usable = curve_runs[~curve_runs["failed"].fillna(False).astype(bool)]
            result.epochs = epochs_answer(list(usable["curve"]), design.base_epochs, alpha, margin)
            if result.epochs.verdict not in SETTLED and question.key not in done:
                result.needs.append(Need(question.key, [(curve_runs["cell"].iloc[0], None)]))
    result.at_equal = _at_equal_all(main, curve_runs, design, alpha)
    return result


def _cell(design: Design, key: str, value) -> str:
    return config_key({TASK: design.main, **{f: design.baseline[f] for f in design.vary}, key: value})


def confirm(question: str, pairs: list[tuple[str, str]], main: pd.DataFrame, alpha: float, margin: float,
            rung: int | None) -> dict:
    """Do the pairs of an effect hold at a higher fidelity? Each (higher cell, lower cell) re-run there, Welch's
    interval at `alpha`: `yes` (still higher, its CI excludes 0), `no` (lower, or within +-margin), `not shown`."""
    usable = main[~main["failed"].fillna(False).astype(bool)] if len(main) else main
    out = []
    for higher, lower in pairs:
        a = usable.loc[usable["cell"] == higher, "objective"].tolist() if len(usable) else []
        b = usable.loc[usable["cell"] == lower, "objective"].tolist() if len(usable) else []
        interval = welch(a, b, alpha)
        verdict = ("not shown" if not (math.isfinite(interval.low) and math.isfinite(interval.high)) else
                   "yes" if interval.low > 0 else
                   "no" if interval.high < 0 or max(abs(interval.low), abs(interval.high)) < margin else "not shown")
        out.append({"higher": higher, "lower": lower, "verdict": verdict, **_plain(asdict(interval))})
    return {"verdict": out[0]["verdict"] if out else "not checked", "rung": rung, "alpha": alpha, "pairs": out,
            "why": "" if out else "no pair to re-run"}


def _own_cells(answer: Answer, main: pd.DataFrame, design: Design) -> None:
    """Each value's n is its own cell's: the baseline with only this factor changed (never the other factors' cells)."""
    if not len(main):
        return
    usable = main[~main["failed"].fillna(False).astype(bool)]
    others = {f: design.baseline[f] for f in design.vary if f != answer.parameter}
    mine = usable[usable[list(others)].eq(pd.Series(others)).all(axis=1)] if others else usable
    for lv in [*answer.levels, *answer.failing]:
        lv.cell_n = int((mine[answer.parameter] == lv.value).sum())


def _baseline_cell(main: pd.DataFrame, design: Design) -> str | None:
    if not len(main):
        return None
    factors = list(design.vary)
    at_baseline = main[factors].eq(pd.Series({f: design.baseline[f] for f in factors})).all(axis=1)
    return main.loc[at_baseline, "cell"].iloc[0] if at_baseline.any() else None


def _at_equal_all(main: pd.DataFrame, curve_runs, design: Design, alpha: float) -> dict[str, list[AtEqual]]:
    """Each value of a factor with `compare_at` against the long curve read at its own updates/seconds/images.

    These comparisons share the look's error rate (Bonferroni over all of them), apart from the verdicts.
    """
    asked = {q.key: q.compare_at for q in design.questions.values() if q.kind == FACTOR and q.compare_at}
    if not asked or curve_runs is None or not len(curve_runs) or not len(main):
        return {}
    usable = curve_runs[~curve_runs["failed"].fillna(False).astype(bool)]
    own = main["from_epochs_arm"].isna() if "from_epochs_arm" in main else pd.Series(True, index=main.index)
    main = main[~main["failed"].fillna(False).astype(bool) & own]
    comparisons = [(key, value, axis) for key, axes in asked.items() for value in design.vary[key]
                   if value != design.baseline[key] for axis in axes]
    share = alpha / max(1, len(comparisons))
    out: dict[str, list[AtEqual]] = {}
    for key, value, axis in comparisons:
        others = {f: design.baseline[f] for f in design.vary if f != key}
        rows = main[(main[key] == value) & main[list(others)].eq(pd.Series(others)).all(axis=1)] if others else \
            main[main[key] == value]
        if not len(rows) or axis not in rows or rows[axis].isna().all():
            continue
        at = float(np.median(rows[axis].dropna()))
        scales = [list(s) for s in usable[f"{axis}_scale"]]
        out.setdefault(key, []).append(at_equal(rows["objective"].tolist(), at, list(usable["curve"]), scales,
                                                value, axis, share))
    return out


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


# --- a look as plain data (JSON on the study) and back -------------------------------------------------------------

def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; read back as NaN
    return value


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _floats(cls, stored: dict) -> dict:
    """Stored fields of `cls`, with NaN given back where JSON kept None for a float field."""
    out = {}
    for f in fields(cls):
        if f.name in stored:
            out[f.name] = _float(stored[f.name]) if f.type in ("float", float) else stored[f.name]
    return out


def _interval(stored: dict | None) -> Interval | None:
    return Interval(**_floats(Interval, stored)) if stored else None


def _answer(stored: dict) -> Answer:
    answer = Answer(**{**_floats(Answer, stored), "levels": [], "failing": [], "pairs": [], "decisive": [],
                       "pair": None})
    answer.levels = [Level(**_floats(Level, lv)) for lv in stored.get("levels") or []]
    answer.failing = [Level(**_floats(Level, lv)) for lv in stored.get("failing") or []]
    answer.pairs = [tuple(p) for p in stored.get("pairs") or []]
    answer.decisive = [tuple(p) for p in stored.get("decisive") or []]
    answer.pair = tuple(stored["pair"]) if stored.get("pair") else None
    return answer


def _epochs(stored: dict) -> EpochsAnswer:
    answer = EpochsAnswer(**{**_floats(EpochsAnswer, stored), "overfits": None, "gain": None, "mean": []})
    answer.plateau = tuple(stored["plateau"]) if stored.get("plateau") else None
    answer.overfits, answer.gain = _interval(stored.get("overfits")), _interval(stored.get("gain"))
    answer.mean = [_interval(m) for m in stored.get("mean") or []]
    return answer


def _at_equal(stored: dict) -> AtEqual:
    return AtEqual(**{**_floats(AtEqual, stored), "difference": _interval(stored.get("difference"))})

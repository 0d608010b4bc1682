"""What a finished study says, as data: each question's answer, its cost, the noise, the failures.

A designed study is read look by look (its rounds): a verdict holds if any look's CI settled it
(each look had its own share of the error rate), and the estimates and CIs are the last look's.
An optimiser's study gets one additive model over its searched parameters. Nothing here formats
text: `answers` and `write` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd

from cnnexp.record import StudyRecord, TrialRecord
from cnnexp.stats.curves import AtEqual, EpochsAnswer, Interval, at_equal, epochs_answer, mean_interval
from cnnexp.stats.effects import Answer, answers
from cnnexp.stats.sequential import spend
from cnnexp.stats.settle import Look, cell_key, look, tables


@dataclass
class Cost:
    """Median cost of a cell's runs."""

    params: float = float("nan")
    flops: float = float("nan")
    seconds: float = float("nan")
    updates: float = float("nan")


@dataclass
class Regime:
    """Where the answers were measured."""

    train_images: int | None = None
    epochs: int | None = None
    eval_images: int | None = None
    baseline: Interval | None = None      # the baseline's score (its runs' mean, t interval)
    note: str = ""                        # about the data (e.g. the JPEG copy, MNIST from t10k)


@dataclass
class Noise:
    """The seed-to-seed SD, how much of it the evaluation set's finite size explains, and the SD per cell."""

    sd: float = float("nan")              # pooled within-cell SD of usable runs
    df: int = 0
    eval_sd: float = float("nan")         # binomial SD of one run's score from its evaluation images
    per_cell: list[tuple[str, int, float]] = field(default_factory=list)  # (cell, n, SD)

    @property
    def eval_share(self) -> float:
        return self.eval_sd ** 2 / self.sd ** 2 if self.sd > 0 else float("nan")


@dataclass
class Analysis:
    metric: str
    design: dict | None
    factors: dict[str, Answer] = field(default_factory=dict)
    epochs: EpochsAnswer | None = None
    measured: dict[str, Interval] = field(default_factory=dict)
    measured_runs: dict[str, pd.DataFrame] = field(default_factory=dict)
    batch_equal: list[AtEqual] = field(default_factory=list)
    settled_at: dict[str, int] = field(default_factory=dict)    # question -> the look that settled it
    looks: list[dict] = field(default_factory=list)              # the study's rounds, as recorded
    costs: dict[str, Cost] = field(default_factory=dict)         # cell -> its cost
    seconds: dict[str, float] = field(default_factory=dict)      # question -> training seconds spent on it
    regime: Regime = field(default_factory=Regime)
    noise: Noise = field(default_factory=Noise)
    failed: list[TrialRecord] = field(default_factory=list)
    precision: float | None = None
    alpha: float = 0.05
    objectives: list[tuple[str, str]] = field(default_factory=list)  # (metric, direction), several: accuracy vs cost
    front: list[TrialRecord] = field(default_factory=list)          # the Pareto front, feasible trials only
    infeasible: list[int] = field(default_factory=list)             # trials beyond the constraints
    champion: int | None = None


def kinds_of(study: optuna.Study) -> dict[str, str]:
    """What each searched parameter is, as its search expression declared: choice -> categorical, else a slope."""
    kinds = {}
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                kinds[name] = "categorical"
            else:
                kinds[name] = "log" if getattr(dist, "log", False) else "linear"
    return kinds


def _cost(runs: list[TrialRecord]) -> Cost:
    def median(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else float("nan")

    return Cost(median(r.num_params for r in runs), median(r.flops for r in runs), median(r.duration_s for r in runs),
                median(r.updates for r in runs))


def _noise(main: pd.DataFrame, records: list[TrialRecord]) -> Noise:
    usable = main[~main["failed"].fillna(False).astype(bool)] if len(main) else main
    groups = [(cell, values.astype(float)) for cell, values in usable.groupby("cell")["objective"]] if len(usable) else []
    per_cell = [(cell, len(v), float(v.std(ddof=1))) for cell, v in groups if len(v) > 1]
    df = sum(n - 1 for _, n, _ in per_cell)
    sd = math.sqrt(sum((n - 1) * s ** 2 for _, n, s in per_cell) / df) if df else float("nan")
    evals = [r.eval_images for r in records if r.complete and r.eval_images]
    mean = float(usable["objective"].mean()) if len(usable) else float("nan")
    eval_sd = math.sqrt(mean * (1 - mean) / float(np.median(evals))) if evals and 0 < mean < 1 else float("nan")
    return Noise(sd, df, eval_sd, per_cell)


def analyse(study: optuna.Study, records: list[TrialRecord], facts: StudyRecord, answers_cfg) -> Analysis:
    precision, alpha = float(answers_cfg.precision), float(answers_cfg.alpha)
    result = Analysis(metric=facts.metric, design=facts.design, precision=precision, alpha=alpha, looks=facts.rounds)
    result.failed = [r for r in records if r.failed_outcome]
    for cell, runs in _by_cell(records).items():
        result.costs[cell] = _cost(runs)
    if facts.design:
        _designed(result, records, facts.design, answers_cfg)
    else:
        _searched(result, study, records, precision, alpha)
    if len(study.directions) > 1:
        _front(result, study, records, facts)
    return result


def _front(result: Analysis, study: optuna.Study, records: list[TrialRecord], facts: StudyRecord) -> None:
    """Accuracy against cost: the non-dominated complete trials that meet the study's constraints."""
    directions = [d.name.lower() for d in study.directions]
    names = (facts.objectives or [facts.metric, *[f"objective {i}" for i in range(1, len(directions))]])
    result.objectives = list(zip(names, directions))
    by_number = {r.number: r for r in records}
    result.infeasible = [r.number for r in records if r.complete and any(
        (r.cost(name) if r.cost(name) is not None else float("inf")) > limit for name, limit in facts.constraints)]
    result.front = [by_number[t.number] for t in study.best_trials if t.number not in result.infeasible]
    result.front.sort(key=lambda r: r.values[0], reverse=directions[0] == "maximize")
    result.champion = (facts.champion or {}).get("trial")


def _by_cell(records: list[TrialRecord]) -> dict[str, list[TrialRecord]]:
    cells: dict[str, list[TrialRecord]] = {}
    for r in records:
        if r.complete:
            cells.setdefault(cell_key(r.params), []).append(r)
    return cells


def _designed(result: Analysis, records: list[TrialRecord], design: dict, answers_cfg) -> None:
    looks = result.looks or [{"round": max((r.round for r in records), default=1), "final": True}]
    seen: Look | None = None
    for entry in looks:
        alpha = entry.get("alpha") or spend(entry["round"], int(answers_cfg.looks), result.alpha, True)
        seen = look(*tables(records, design, entry["round"]), design, alpha, result.precision)
        for question, verdict in seen.verdicts().items():
            if verdict in ("effect", "equivalent") and question not in result.settled_at:
                result.settled_at[question] = entry["round"]
                _keep(result, question, seen)
    for question in seen.verdicts():  # the last look for the rest
        if question not in result.settled_at:
            _keep(result, question, seen)
    main, measured, curve = tables(records, design)
    result.measured_runs = measured
    result.noise = _noise(main, records)
    _regime(result, records, design, main)
    _seconds(result, records, design)
    if curve is not None and len(curve) and "train.batch_size" in design["vary"]:
        result.batch_equal = _batch_at_equal(records, design, curve, main)


def _keep(result: Analysis, question: str, seen: Look) -> None:
    if question == "train.epochs":
        result.epochs = seen.epochs
    elif question.startswith("task="):
        result.measured[question[5:]] = seen.measured[question[5:]]
    else:
        result.factors[question] = seen.factors[question]


def _regime(result: Analysis, records: list[TrialRecord], design: dict, main: pd.DataFrame) -> None:
    mine = [r for r in records if r.complete and r.params.get("task") == design["main"]]
    baseline = main[main[list(design["vary"])].eq(pd.Series({k: design["baseline"][k] for k in design["vary"]}))
                    .all(axis=1)] if len(main) else main
    usable = baseline[~baseline["failed"].fillna(False).astype(bool)] if len(baseline) else baseline
    notes = sorted({r.dataset_note for r in records if r.complete and r.dataset_note})
    result.regime = Regime(train_images=_median(r.train_images for r in mine), epochs=int(design["base_epochs"]),
                           eval_images=_median(r.eval_images for r in mine),
                           baseline=mean_interval(usable["objective"].tolist()) if len(usable) else None,
                           note="; ".join(notes))


def _median(values) -> int | None:
    values = [v for v in values if v]
    return int(np.median(values)) if values else None


def _seconds(result: Analysis, records: list[TrialRecord], design: dict) -> None:
    """Training seconds per question: its own cells, plus the shared baseline split between the factors."""
    baseline = {k: design["baseline"][k] for k in design["vary"]}
    factors = list(design["vary"])
    for r in records:
        if r.duration_s is None:
            continue
        task = r.params.get("task")
        if task == design["main"]:
            changed = [f for f in factors if r.params.get(f) != baseline[f]]
            for f in (changed or factors):
                result.seconds[f] = result.seconds.get(f, 0.0) + r.duration_s / (1 if changed else len(factors))
        elif task == design.get("curve_arm") or task in design.get("epoch_arms", {}):
            result.seconds["train.epochs"] = result.seconds.get("train.epochs", 0.0) + r.duration_s
        else:
            result.seconds[f"task={task}"] = result.seconds.get(f"task={task}", 0.0) + r.duration_s


def _batch_at_equal(records: list[TrialRecord], design: dict, curve: pd.DataFrame, main: pd.DataFrame) -> list[AtEqual]:
    """Every batch size read against the baseline's long curves at its own number of updates, and of seconds."""
    arm = [r for r in records if r.complete and r.params.get("task") == design["curve_arm"] and not r.flag]
    if not arm:
        return []
    steps = [r.updates / r.epochs_run for r in arm]
    update_scales = [[s * e for e in sorted(r.curve)] for r, s in zip(arm, steps)]
    time_scales = [list(np.cumsum(r.epoch_seconds)) if r.epoch_seconds else [] for r in arm]
    out = []
    others = {k: design["baseline"][k] for k in design["vary"] if k != "train.batch_size"}
    for level in design["vary"]["train.batch_size"]:
        if level == design["baseline"]["train.batch_size"]:
            continue  # the reference curves are the baseline's own: comparing them with it says nothing
        runs = [r for r in records if r.complete and not r.flag and r.params.get("task") == design["main"]
                and r.params.get("train.batch_size") == level and all(r.params.get(k) == v for k, v in others.items())
                and r.params.get("task") != design["curve_arm"]]
        if not runs:
            continue
        values = [r.value for r in runs]
        updates = float(np.median([r.updates for r in runs]))
        seconds = float(np.median([sum(r.epoch_seconds) for r in runs if r.epoch_seconds] or [math.nan]))
        out.append(at_equal(values, updates, [r.curve for r in arm], update_scales, level, "updates"))
        if math.isfinite(seconds):
            out.append(at_equal(values, seconds, [r.curve for r in arm], time_scales, level, "seconds"))
    return out


def _searched(result: Analysis, study: optuna.Study, records: list[TrialRecord], precision: float,
              alpha: float) -> None:
    """An optimiser's study: one additive model over every searched parameter, epochs from the full curves."""
    kinds = kinds_of(study)
    done = [r for r in records if r.complete]
    table = pd.DataFrame([{**r.params, "objective": r.value, "seed": r.seed, "failed": r.failed_outcome,
                           "cell": cell_key(r.params)} for r in records if r.complete or r.failed_outcome])
    params = sorted(kinds)
    # A searched train.seed is a factor of its own: seed blocks would be the same columns again.
    blocks = None if "train.seed" in kinds else "seed"
    for answer in answers(table, params, kinds, alpha=alpha, precision=precision, seed_column=blocks):
        result.factors[answer.parameter] = answer
    longest = max((max(r.curve) for r in done if r.curve), default=0)
    full = [r.curve for r in done if r.curve and max(r.curve) == longest and "train.epochs" not in kinds]
    if len(full) >= 2:
        result.epochs = epochs_answer(full, 1, alpha, precision)
    result.noise = _noise(table.assign(cell=table["cell"]) if len(table) else table, records)
    notes = sorted({r.dataset_note for r in done if r.dataset_note})
    result.regime = Regime(train_images=_median(r.train_images for r in done), epochs=longest or None,
                           eval_images=_median(r.eval_images for r in done), note="; ".join(notes))

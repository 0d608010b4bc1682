"""What a finished study says, as data: each question's answer, its cost, the noise, the failures.

A designed study's answers are what its looks recorded (`record.LookRecord`): a question keeps the
answer of the first look that settled it (each look had its own share of the error rate), the
others the last look's; nothing the sweep decided is decided again here. An optimiser's study gets
one additive model over its searched parameters. Nothing here formats text: `prose` and `write` do.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd

from cnnexp.design import Design, config_key, tables
from cnnexp.plan import Plan
from cnnexp.record import LookRecord, StudyRecord, TrialRecord
from cnnexp.stats.curves import AtEqual, EpochsAnswer, Interval, epochs_answer
from cnnexp.stats.effects import Answer, factor_answers
from cnnexp.stats.sequential import spend
from cnnexp.stats.settle import Look, look


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
    plan: Plan | None = None              # how the training-set size was chosen (a rung, or pinned)


@dataclass
class Noise:
    """Between runs of one configuration, the evaluation images' share of it, and the SD per configuration."""

    sd: float = float("nan")              # pooled within-configuration SD of usable runs
    df: int = 0
    binomial_sd: float = float("nan")     # what one run's right/wrong on its evaluation images alone gives
    eval_sd: float = float("nan")         # the evaluation images' shared term in a typical contrast (measured)
    contrast_sd: float = float("nan")     # that contrast's SD from the runs alone
    per_cell: list[tuple[str, int, float]] = field(default_factory=list)  # (cell, n, SD)


@dataclass
class Analysis:
    metric: str
    design: Design | None
    factors: dict[str, Answer] = field(default_factory=dict)
    epochs: EpochsAnswer | None = None
    measured: dict[str, Interval] = field(default_factory=dict)
    measured_runs: dict[str, pd.DataFrame] = field(default_factory=dict)
    at_equal: dict[str, list[AtEqual]] = field(default_factory=dict)  # a factor's values against the long curve
    settled_at: dict[str, int] = field(default_factory=dict)    # question -> the look that settled it
    looks: list[LookRecord] = field(default_factory=list)        # the study's looks, as recorded
    confirmations: dict[str, dict] = field(default_factory=dict)  # effect -> what the next rung showed
    provisional: bool = False                                    # no look recorded yet: answers for information only
    costs: dict[str, Cost] = field(default_factory=dict)         # cell -> its cost
    seconds: dict[str, float] = field(default_factory=dict)      # question -> training seconds spent on it
    regime: Regime = field(default_factory=Regime)
    noise: Noise = field(default_factory=Noise)
    failed: list[TrialRecord] = field(default_factory=list)
    margin: float | None = None
    alpha: float = 0.05
    objectives: list[tuple[str, str]] = field(default_factory=list)  # (metric, direction), several: accuracy vs cost
    front: list[TrialRecord] = field(default_factory=list)          # the Pareto front, feasible trials only
    infeasible: list[int] = field(default_factory=list)             # trials beyond the constraints
    champion: int | None = None
    training_share: float = float("nan")                            # of the study's wall, in training steps
    wall_s: float = float("nan")


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


def _noise(main: pd.DataFrame, records: list[TrialRecord], contrast: tuple[float, float] | None = None) -> Noise:
    usable = main[~main["failed"].fillna(False).astype(bool)] if len(main) else main
    groups = ([(cell, values.astype(float)) for cell, values in usable.groupby("cell")["objective"]]
              if len(usable) else [])
    per_cell = [(cell, len(v), float(v.std(ddof=1))) for cell, v in groups if len(v) > 1]
    df = sum(n - 1 for _, n, _ in per_cell)
    sd = math.sqrt(sum((n - 1) * s ** 2 for _, n, s in per_cell) / df) if df else float("nan")
    evals = [r.eval_images for r in records if r.complete and r.eval_images]
    mean = float(usable["objective"].mean()) if len(usable) else float("nan")
    binomial = math.sqrt(mean * (1 - mean) / float(np.median(evals))) if evals and 0 < mean < 1 else float("nan")
    eval_sd, contrast_sd = contrast if contrast else (float("nan"), float("nan"))
    return Noise(sd, df, binomial, eval_sd, contrast_sd, per_cell)


def analyse(study: optuna.Study, records: list[TrialRecord], facts: StudyRecord, answers_cfg) -> Analysis:
    margin, alpha = float(answers_cfg.margin), float(answers_cfg.alpha)
    result = Analysis(metric=facts.metric or "val_accuracy", design=facts.design, margin=margin, alpha=alpha,
                      looks=facts.rounds)
    result.failed = [r for r in records if r.failed_outcome]
    for cell, runs in _by_cell(records).items():
        result.costs[cell] = _cost(runs)
    if facts.design:
        _designed(result, [r for r in records if r.confirms is None], facts, answers_cfg)
    else:
        _searched(result, study, records, margin, alpha)
    if len(study.directions) > 1:
        _front(result, study, records, facts)
    _wall(result, study, records, facts)
    return result


def _wall(result: Analysis, study: optuna.Study, records: list[TrialRecord], facts: StudyRecord) -> None:
    """The study's wall from its first trial's start (or its plan's timing) to now, and the share of it spent in
    training steps (each epoch's seconds, its validation taken out)."""
    starts = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start]
    began = facts.started_at or (min(starts).timestamp() if starts else None)
    if began is None:
        return
    result.wall_s = max(time.time() - float(began), 1e-9)
    steps = sum(r.step_seconds or 0.0 for r in records)
    result.training_share = steps / result.wall_s if steps else float("nan")


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
        if r.complete and r.confirms is None:
            cells.setdefault(config_key(r.params), []).append(r)
    return cells


def _designed(result: Analysis, records: list[TrialRecord], facts: StudyRecord, answers_cfg) -> None:
    design = facts.design
    main, measured, curve = tables(records, design)
    recorded = [entry for entry in facts.rounds if entry.look is not None]
    if not recorded:  # no look taken yet (a report while the first round runs): the first look's rate, said so
        alpha = spend(1, int(answers_cfg.looks), result.alpha, final=int(answers_cfg.looks) == 1)
        recorded = [LookRecord(1, alpha, False, look=look(main, measured, curve, design, alpha, result.margin))]
        result.provisional = True
    settled = facts.settled_at()
    for entry in recorded:
        for question in entry.look.verdicts():
            chosen = settled.get(question, recorded[-1].round)
            if entry.round == chosen or (question not in settled and entry is recorded[-1]):
                _keep(result, question, entry.look)
    result.settled_at = settled
    result.at_equal = recorded[-1].look.at_equal
    result.confirmations = recorded[-1].confirmations or {}
    result.measured_runs = measured
    result.noise = _noise(main, records, _eval_term(main, design))
    _regime(result, records, design, main, facts.plan)
    _seconds(result, records, design)


def _keep(result: Analysis, question: str, seen: Look) -> None:
    if question in seen.factors:
        result.factors[question] = seen.factors[question]
    elif question in seen.measured:
        result.measured[question] = seen.measured[question]
    elif seen.epochs is not None:
        result.epochs = seen.epochs


def _eval_term(main: pd.DataFrame, design: Design) -> tuple[float, float] | None:
    """(the evaluation images' SD, the runs' SD) in the contrast of the first factor's first other value against
    the baseline, measured from what the runs kept: what the noise line reports."""
    from cnnexp.stats.model import fit

    factors = list(design.vary)
    usable = main[~main["failed"].fillna(False).astype(bool)] if len(main) else main
    if not factors or not len(usable) or "correct" not in usable or usable["correct"].isna().all():
        return None
    fitted = fit(usable, [f for f in factors if usable[f].nunique() > 1], {f: "categorical" for f in factors})
    if fitted is None or fitted.images is None or not fitted.terms:
        return None
    term = next(iter(fitted.terms.values()))
    a = np.zeros(len(fitted.beta))
    a[term.columns[0]] = 1.0
    _, se, _ = fitted.contrast(a)
    share = fitted.eval_share(a)
    return math.sqrt(share) * se, math.sqrt(1 - share) * se


def _regime(result: Analysis, records: list[TrialRecord], design: Design, main: pd.DataFrame,
            plan: Plan | None) -> None:
    from cnnexp.stats.curves import mean_interval

    mine = [r for r in records if r.complete and r.params.get("task") == design.main]
    baseline = main[main[list(design.vary)].eq(pd.Series({k: design.baseline[k] for k in design.vary}))
                    .all(axis=1)] if len(main) else main
    usable = baseline[~baseline["failed"].fillna(False).astype(bool)] if len(baseline) else baseline
    notes = sorted({r.dataset_note for r in records if r.complete and r.dataset_note})
    result.regime = Regime(train_images=_median(r.train_images for r in mine), epochs=design.base_epochs,
                           eval_images=_median(r.eval_images for r in mine),
                           baseline=mean_interval(usable["objective"].tolist()) if len(usable) else None,
                           note="; ".join(notes), plan=plan)


def _median(values) -> int | None:
    values = [v for v in values if v]
    return int(np.median(values)) if values else None


def _seconds(result: Analysis, records: list[TrialRecord], design: Design) -> None:
    """Training seconds per question: its own cells, plus the shared baseline split between the factors."""
    baseline = {k: design.baseline[k] for k in design.vary}
    factors = list(design.vary)
    for r in records:
        if r.duration_s is None:
            continue
        task = r.params.get("task")
        if task == design.main:
            changed = [f for f in factors if r.params.get(f) != baseline[f]]
            for f in (changed or factors):
                result.seconds[f] = result.seconds.get(f, 0.0) + r.duration_s / (1 if changed else len(factors))
        elif task == design.curve_arm or task in design.epoch_arms:
            result.seconds["train.epochs"] = result.seconds.get("train.epochs", 0.0) + r.duration_s
        else:
            result.seconds[task] = result.seconds.get(task, 0.0) + r.duration_s


def _searched(result: Analysis, study: optuna.Study, records: list[TrialRecord], margin: float,
              alpha: float) -> None:
    """An optimiser's study: one additive model over every searched parameter, epochs from the full curves."""
    kinds = kinds_of(study)
    done = [r for r in records if r.complete]
    table = pd.DataFrame([{**r.params, "objective": r.value, "seed": r.seed, "failed": r.failed_outcome,
                           "cell": config_key(r.params)} for r in records if r.complete or r.failed_outcome])
    params = sorted(kinds)
    # A searched train.seed is a factor of its own: seed blocks would be the same columns again.
    blocks = None if "train.seed" in kinds else "seed"
    for answer in factor_answers(table, params, kinds, alpha=alpha, margin=margin, seed_column=blocks):
        result.factors[answer.parameter] = answer
    longest = max((max(r.curve) for r in done if r.curve), default=0)
    full = [r.curve for r in done if r.curve and max(r.curve) == longest and "train.epochs" not in kinds]
    if len(full) >= 2:
        result.epochs = epochs_answer(full, 1, alpha, margin)
    result.noise = _noise(table.assign(cell=table["cell"]) if len(table) else table, records)
    notes = sorted({r.dataset_note for r in done if r.dataset_note})
    result.regime = Regime(train_images=_median(r.train_images for r in done), epochs=longest or None,
                           eval_images=_median(r.eval_images for r in done), note="; ".join(notes))

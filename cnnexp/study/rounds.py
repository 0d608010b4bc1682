"""A designed study's rounds: look at the answers after each round, and queue the seeds that settle the rest.

After the first round (every cell with its first seeds), whoever finds the queue empty looks at the
answers at this look's share of the error rate (`cnnexp.stats.sequential.spend`). Unsettled
questions get a next round: replicates where they narrow the undecided contrasts most per second
of training (`allocate`), within this round's share of the budget that is left. It stops when
every question is settled, the budget is spent, or `answers.looks` looks were taken; each look is
recorded on the study (its error rate, its verdicts, the seconds spent and left).
"""

from __future__ import annotations

import math

import numpy as np
import optuna

from cnnexp import record, stores
from cnnexp.console import say
from cnnexp.stats.sequential import Cell, allocate, spend
from cnnexp.stats.settle import Look, cell_key, look, tables
from cnnexp.study.budget import Plan, calibration
from cnnexp.study.space import Sweep

BUSY = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)


def cell_of(design: dict):
    """A function giving a trial's cell name (the epochs arm is its own cell here: it costs what it costs)."""
    return lambda facts: cell_key(facts.params)


def _cells(main, measured, curve, plan: Plan, ratio: float) -> dict[str, Cell]:
    """Every cell's runs, noise and cost, for the allocation."""
    state: dict[str, Cell] = {}
    groups = [(main, "objective"), *((runs, "test_accuracy") for runs in measured.values())]
    if curve is not None and len(curve):
        gains = curve.assign(gain=[c[max(c)] - c[min(c)] if c else math.nan for c in curve["curve"]])
        groups.append((gains, "gain"))
    variances = []
    for runs, column in groups:
        if not len(runs):
            continue
        for cell, group in runs.groupby("cell"):
            values = group.loc[~group["failed"].fillna(False).astype(bool), column]
            var = float(values.var(ddof=1)) if len(values) > 1 else math.nan
            variances.append(var)
            state[cell] = Cell(n=len(values), variance=var, seconds=_seconds(plan, cell, ratio))
    pooled = float(np.nanmedian(variances)) if any(np.isfinite(variances)) else 1e-4
    for cell in state.values():
        if not math.isfinite(cell.variance) or cell.variance <= 0:
            cell.variance = pooled
    return state


def _seconds(plan: Plan, cell: str, ratio: float) -> float:
    try:
        return plan.predict(cell, ratio)
    except KeyError:
        return math.inf


def advance(study: optuna.Study, sweep: Sweep, plan: Plan | None) -> bool:
    """Look at the answers once the current round is done; queue the next round if it helps. True: queued."""
    design, answers = sweep.design.describe(), sweep.answers
    with stores.lock(str(sweep.settings.storage)):
        trials = study.get_trials(deepcopy=False)
        if any(t.state in BUSY for t in trials):
            return False
        records = [record.read_trial(t) for t in trials]
        facts = record.read_study(study)
        current = max((r.round for r in records), default=1)
        if facts.rounds and facts.rounds[-1]["round"] == current:
            return False  # already looked at this round (another worker, or a resumed study)
        spent = sum(r.duration_s or 0.0 for r in records)
        left = (plan.budget_s - spent) if plan is not None else 0.0
        ratio = calibration(plan, records, cell_of(design)) if plan is not None else 1.0
        looks, alpha, precision = int(answers.looks), float(answers.alpha), float(answers.precision)
        tabled = tables(records, design)
        final = plan is None or current >= looks
        seen = look(*tabled, design, spend(current, looks, alpha, final), precision)
        add = {} if final or not seen.needs else allocate(
            seen.needs, _cells(*tabled, plan, ratio), left / max(1, looks - current))
        if not final and seen.needs and not add:  # the budget is spent: this look is the last, it spends the rest
            final = True
            seen = look(*tabled, design, spend(current, looks, alpha, True), precision)
        _record(study, facts, current, seen, final or not seen.needs, spent, left, ratio)
        _queue(study, sweep, add, current + 1)
    return bool(add)


def _record(study, facts, current: int, seen: Look, final: bool, spent: float, left: float, ratio: float) -> None:
    entry = {"round": current, "alpha": seen.alpha, "final": final, "verdicts": seen.verdicts(),
             "seconds_spent": round(spent, 1), "seconds_left": round(left, 1), "calibration": round(ratio, 3),
             "undecided": [need.question for need in seen.needs]}
    record.write_study(study, rounds=[*facts.rounds, entry])
    settled = sum(1 for v in entry["verdicts"].values() if v in ("effect", "equivalent", "measured")) - len(
        [q for q in entry["undecided"] if q.startswith("task=")])
    say(f"Look {current} (error rate {seen.alpha:.4f}): {settled} of {len(entry['verdicts'])} questions settled"
        + (f"; undecided: {', '.join(entry['undecided'])}" if entry["undecided"] else "") + ".")


def _queue(study, sweep: Sweep, add: dict[str, int], next_round: int) -> None:
    if not add:
        return
    by_key = {cell_key(cell): cell for cell in sweep.design.cells()}
    for cell, runs in sorted(add.items()):
        for _ in range(runs):
            record.enqueue(study, by_key[cell], round=next_round)
    say(f"Round {next_round}: {sum(add.values())} more runs to settle the answers: "
        + ", ".join(f"{cell} x{runs}" for cell, runs in sorted(add.items())) + ".")

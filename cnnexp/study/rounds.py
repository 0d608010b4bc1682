"""A designed study's rounds: look at the answers after each round, queue the seeds that settle the rest, and
confirm the effects found at the next rung of training images.

After the first round (every cell with its first seeds), whoever finds the queue empty looks at the
answers at this look's share of the error rate (`cnnexp.stats.sequential.spend`). A question a look
settled stays settled: later looks answer it again for the record but never buy it more seeds.
Unsettled questions get a next round: replicates where they narrow the undecided contrasts most per
second of training (`allocate`), within this round's share of the budget that is left. It stops
when every question is settled, the budget is spent, or `answers.looks` looks were taken; each look
is recorded on the study (`record.LookRecord`: its error rate, its answers, the seconds spent and
left), and the report reads those records.

After the last look, each `effect` is re-run at the next rung of the ladder (2-4x the images) with
a few seeds, inside the budget (`answers.confirm`): its deciding pair and the best value against
the baseline. The result is recorded on the last look: holds (yes), does not (no), not shown, or
not checked (and why).
"""

from __future__ import annotations

import math

import numpy as np
import optuna

from cnnexp import record, stores
from cnnexp.console import say
from cnnexp.design import config_key, tables
from cnnexp.plan import Plan
from cnnexp.record import LookRecord
from cnnexp.stats.sequential import Cell, allocate, spend
from cnnexp.stats.settle import SETTLED, confirm, look
from cnnexp.study.budget import calibration
from cnnexp.study.space import Sweep

BUSY = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
CONFIRM_SEEDS = 3  # runs per cell at the next rung: a few, enough for a Welch interval


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
    """Look at the answers once the current round is done; queue the next round (or the confirmations) if it
    helps. True: something was queued."""
    design, answers = sweep.design, sweep.answers
    with stores.lock(str(sweep.settings.storage)):
        trials = study.get_trials(deepcopy=False)
        if any(t.state in BUSY for t in trials):
            return False
        records = [record.read_trial(t) for t in trials]
        facts = record.read_study(study)
        if facts.rounds and facts.rounds[-1].final:
            return _confirmations(study, sweep, plan, records, facts)
        current = max((r.round for r in records if r.confirms is None), default=1)
        if facts.rounds and facts.rounds[-1].round == current:
            return False  # already looked at this round (another worker, or a resumed study)
        spent = sum(r.duration_s or 0.0 for r in records)
        left = (plan.budget_s - spent) if plan is not None else 0.0
        ratio = calibration(plan, records, lambda r: config_key(r.params)) if plan is not None else 1.0
        looks, alpha, margin = int(answers.looks), float(answers.alpha), float(answers.margin)
        main = [r for r in records if r.confirms is None]
        tabled = tables(main, design)
        done = set(facts.settled_at())
        final = plan is None or current >= looks
        seen = look(*tabled, design, spend(current, looks, alpha, final), margin, done)
        add = {} if final or not seen.needs else allocate(
            seen.needs, _cells(*tabled, plan, ratio), left / max(1, looks - current))
        if not final and seen.needs and not add:  # the budget is spent: this look is the last, it spends the rest
            final = True
            seen = look(*tabled, design, spend(current, looks, alpha, True), margin, done)
        entry = LookRecord(current, seen.alpha, final or not seen.needs, round(spent, 1), round(left, 1),
                           round(ratio, 3), [need.question for need in seen.needs], seen)
        record.write_study(study, rounds=[*facts.rounds, entry])
        _say_look(entry, done)
        _queue(study, sweep, add, current + 1)
    return bool(add)


def _say_look(entry: LookRecord, done: set[str]) -> None:
    verdicts = entry.look.verdicts()
    settled = sum(1 for q, v in verdicts.items() if v in SETTLED or q in done)
    say(f"Look {entry.round} (error rate {entry.alpha:.4f}): {settled} of {len(verdicts)} questions settled"
        + (f"; undecided: {', '.join(entry.undecided)}" if entry.undecided else "") + ".")


def _queue(study, sweep: Sweep, add: dict[str, int], next_round: int) -> None:
    if not add:
        return
    for cell, runs in sorted(add.items()):
        for _ in range(runs):
            record.enqueue(study, sweep.design.cell(cell), round=next_round)
    say(f"Round {next_round}: {sum(add.values())} more runs to settle the answers: "
        + ", ".join(f"{cell} x{runs}" for cell, runs in sorted(add.items())) + ".")


# --- confirmation at the next rung -----------------------------------------------------------------------------

def confirmations_pending(study: optuna.Study) -> bool:
    """The last look was taken, but its effects are not yet confirmed (or said unconfirmed)."""
    looks = record.read_study(study).rounds
    return bool(looks) and looks[-1].final and looks[-1].confirmations is None


def _confirmations(study, sweep: Sweep, plan: Plan | None, records, facts) -> bool:
    """After the last look: queue the confirmations once; when they are done, record what they show."""
    last = facts.rounds[-1]
    if last.confirmations is not None:
        return False
    asked = {q: pairs for q, pairs in last.look.effect_pairs(sweep.design).items()}
    queued = [r for r in records if r.confirms is not None]
    if queued:  # they ran: record what they show
        last.confirmations = {q: confirm(q, pairs, tables(queued, sweep.design)[0], float(sweep.answers.alpha),
                                         float(sweep.answers.margin), queued[0].train_limit)
                              for q, pairs in asked.items()}
        _keep(study, facts, last)
        return False
    why = _why_not(sweep, plan, asked)
    cells = sorted({cell for pairs in asked.values() for pair in pairs for cell in pair})
    cost = sum(CONFIRM_SEEDS * _seconds_at(plan, c, records) for c in cells) if plan else math.inf
    left = plan.budget_s - sum(r.duration_s or 0.0 for r in records) if plan else 0.0
    if not why and cost > left:
        why = (f"not checked: it needs about {cost / 60:.1f} min at {plan.next_rung():,} images, "
               f"{left / 60:.1f} min left")
    if why:
        last.confirmations = {q: {"verdict": "not checked", "why": why} for q in asked}
        _keep(study, facts, last)
        return False
    for cell in cells:
        for _ in range(CONFIRM_SEEDS):
            record.enqueue(study, sweep.design.cell(cell), round=last.round + 1, confirms=",".join(sorted(asked)),
                           train_limit=plan.next_rung())
    say(f"Confirming {', '.join(sorted(asked))} at {plan.next_rung():,} training images "
        f"({plan.next_rung() // plan.train_limit}x the study's): {len(cells)} cells x {CONFIRM_SEEDS} seeds, "
        f"about {cost / 60:.1f} min.")
    return True


def _why_not(sweep: Sweep, plan: Plan | None, asked: dict) -> str:
    if not asked:
        return ""
    if not bool(sweep.answers.confirm):
        return "not checked: answers.confirm is false"
    if plan is None or plan.next_rung() is None:
        return "not checked: no larger rung of training images (the study trains on all of them, or has no budget)"
    return ""


def _seconds_at(plan: Plan, cell: str, records) -> float:
    ratio = calibration(plan, records, lambda r: config_key(r.params))
    try:
        return plan.predict(cell, ratio, images=plan.next_rung())
    except KeyError:
        return math.inf


def _keep(study, facts, last: LookRecord) -> None:
    record.write_study(study, rounds=[*facts.rounds[:-1], last])
    for question, said in last.confirmations.items():
        say(f"Confirmation of {question}: {said['verdict']}" + (f" ({said['why']})" if said.get("why") else ""))


# --- queues: the first round's cells, the repeats ------------------------------------------------------------------

def enqueue_design(study: optuna.Study, sweep: Sweep) -> int:
    """Queue every cell of a designed study's first round, minus what the study already holds."""
    with stores.lock(str(sweep.settings.storage)):
        records = [r for r in record.read_trials(study) if r.round == 1 and r.repeat_of is None]
        queued = 0
        for cell, count in sweep.design.first_round():
            key = config_key(cell)
            mine = [r for r in records if config_key(r.params) == key]
            have = sum(1 for r in mine if r.state != "FAIL")
            # A failed cell is queued again on the next run, but not forever: at most twice its seeds.
            for _ in range(min(count - have, 2 * count - len(mine))):
                record.enqueue(study, cell)
                queued += 1
    return queued


def enqueue_repeats(study: optuna.Study, settings, dry_run: bool = False) -> int:
    """Queue `repeats` more seeds of the best `repeat_top` configurations (idempotent across reruns).

    Repeats live in the main study, marked `repeat_of`: each gets the next unused seed of its
    configuration (a genuine replicate), they don't count towards `n_trials`, and are never pruned.
    `dry_run`: only count what would be queued.
    """
    with stores.lock(str(settings.storage)):
        records = record.read_trials(study)
        main = [r for r in records if r.complete and r.repeat_of is None]
        top = sorted(main, key=lambda r: r.value, reverse=settings.direction == "maximize")[: int(settings.repeat_top)]
        queued = 0
        for source in top:
            have = sum(r.repeat_of == source.number and r.state != "FAIL" for r in records)
            for _ in range(int(settings.repeats) - have):
                if not dry_run:
                    record.enqueue(study, source.params, repeat_of=source.number)
                queued += 1
    return queued

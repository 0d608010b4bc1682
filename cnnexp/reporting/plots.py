"""Plots that answer the question: score per value with 95% CIs and the n each mean uses, a chance line at
1/classes, learning curves with a band, the history, and the answers with their CIs.

A designed study's plot of a factor shows only the runs that compare it: its own cells and the
baseline, never runs where another factor changed. Failed runs (diverged, at chance) are drawn as
red crosses, kept out of the means; pruned trials are grey at their last reported score.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from cnnexp.record import TrialRecord
from cnnexp.reporting.analysis import Analysis
from cnnexp.stats.curves import mean_interval

GREY, BLUE, RED = "#9a9a9a", "#1f5fa8", "#b03030"


def plot_all(records: list[TrialRecord], analysis: Analysis, folder: Path, chance: float | None) -> list[Path]:
    """Write the plots; returns their paths (a plot that fails is skipped with a warning, never the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name, draw):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        try:
            draw(ax)
            fig.tight_layout()
            fig.savefig(folder / name, dpi=110)
            written.append(folder / name)
        except Exception as err:  # noqa: BLE001 - a plot never costs the report
            warnings.warn(f"plot {name} skipped: {err}", stacklevel=2)
        finally:
            plt.close(fig)

    for parameter in analysis.factors:
        save(f"score_vs_{parameter.replace('/', '_')}.png",
             lambda ax, p=parameter: score_vs(ax, _comparing(records, analysis, p), p, analysis.metric, chance))
    save("learning_curves.png", lambda ax: learning_curves(ax, records, analysis, chance))
    save("history.png", lambda ax: history(ax, records, analysis.metric, chance))
    save("answers.png", lambda ax: answers_plot(ax, analysis))
    if analysis.objectives:
        save("pareto.png", lambda ax: pareto(ax, records, analysis))
    return written


def _comparing(records: list[TrialRecord], analysis: Analysis, parameter: str) -> list[TrialRecord]:
    """The runs that compare `parameter`: a design's own cells of it and the baseline; else every run."""
    design = analysis.design
    if not design:
        return [r for r in records if parameter in r.params]
    others = {k: design.baseline[k] for k in design.vary if k != parameter}
    return [r for r in records if r.params.get("task") == design.main and r.confirms is None
            and all(r.params.get(k) == v for k, v in others.items())]


def score_vs(ax, runs: list[TrialRecord], parameter: str, metric: str, chance) -> None:
    values = sorted({r.params[parameter] for r in runs if parameter in r.params}, key=lambda v: (isinstance(v, str), v))
    position = {v: i for i, v in enumerate(values)}
    done = [r for r in runs if r.complete]
    ok, failed = [r for r in done if not r.flag], [r for r in done if r.flag]
    pruned = [r for r in runs if r.state == "PRUNED" and r.curve]
    ax.scatter([position[r.params[parameter]] for r in ok], [r.value for r in ok], color=BLUE, alpha=0.45, s=22,
               label="runs (each seed)")
    if failed:
        ax.scatter([position[r.params[parameter]] for r in failed], [r.value for r in failed], color=RED, marker="x",
                   label="failed: diverged or at chance (not in the means)")
    if pruned:
        ax.scatter([position[r.params[parameter]] for r in pruned], [r.curve[max(r.curve)] for r in pruned], color=GREY,
                   s=18, label="pruned (last epoch reached)")
    means = [mean_interval([r.value for r in ok if r.params[parameter] == v]) for v in values]
    xs = np.arange(len(values))
    errors = np.array([[m.estimate - m.low, m.high - m.estimate] if m.n > 1 else [np.nan, np.nan] for m in means]).T
    ax.errorbar(xs, [m.estimate for m in means], yerr=errors, fmt="o-", color="black", capsize=4, label="mean, 95% CI")
    for x, m in zip(xs, means):
        ax.annotate(f"n={m.n}", (x, m.estimate), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if chance:
        ax.axhline(chance, color=RED, lw=1, ls="--", label=f"chance (1/{round(1 / chance)})")
    ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(parameter)
    ax.set_ylabel(f"{metric} (last epoch)")
    ax.set_title(f"{metric} vs {parameter} (only the runs that compare it)")
    ax.legend(fontsize=8)


def learning_curves(ax, records: list[TrialRecord], analysis: Analysis, chance) -> None:
    """The main task's curves (the baseline trained longer as a band); other tasks go on axes of their own."""
    design = analysis.design
    main = design.main if design else None
    long_arm = design.curve_arm if design else None
    drawn = False
    for r in records:
        if not r.curve or r.params.get("task") == long_arm or r.params.get("task", main) != main:
            continue
        epochs = sorted(r.curve)
        ax.plot(epochs, [r.curve[e] for e in epochs], color=BLUE if r.complete else GREY, alpha=0.3, lw=1)
        drawn = True
    e = analysis.epochs
    if e is not None and e.mean:
        epochs = np.arange(1, len(e.mean) + 1)
        ax.fill_between(epochs, [m.low for m in e.mean], [m.high for m in e.mean], color=BLUE, alpha=0.2,
                        label=f"baseline trained longer: mean, {100 * (1 - e.mean[0].alpha):.3g}% CI (n={e.runs})")
        ax.plot(epochs, [m.estimate for m in e.mean], color="black", lw=2)
        drawn = True
    if not drawn:
        raise ValueError("no trial of the main task reported an epoch")
    if chance:
        ax.axhline(chance, color=RED, lw=1, ls="--", label=f"chance (1/{round(1 / chance)})")
    ax.plot([], [], color=BLUE, alpha=0.5, label="each run (grey: pruned)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel(analysis.metric)
    ax.set_title(f"{analysis.metric} per epoch" + (f" ({main}; other tasks are measured apart)" if main else ""))
    ax.legend(fontsize=8)


def history(ax, records: list[TrialRecord], metric: str, chance) -> None:
    done = [r for r in records if r.complete]
    if not done:
        raise ValueError("no complete trial")
    ax.scatter([r.number for r in done], [r.value for r in done], color=BLUE, s=22, label="complete")
    pruned = [r for r in records if r.state == "PRUNED" and r.curve]
    ax.scatter([r.number for r in pruned], [r.curve[max(r.curve)] for r in pruned], color=GREY, s=18,
               label="pruned (last epoch reached)")
    ax.step([r.number for r in done], np.maximum.accumulate([r.value for r in done]), where="post", color="black",
            label="best so far")
    if chance:
        ax.axhline(chance, color=RED, lw=1, ls="--", label=f"chance (1/{round(1 / chance)})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("history")
    ax.legend(fontsize=8)


def answers_plot(ax, analysis: Analysis) -> None:
    """Each question's reported contrast with its CI (the one that decided its verdict), and the +-margin band."""
    rows = []
    for key, a in analysis.factors.items():
        if a.verdict == "insufficient_data":
            continue
        what = f"{a.pair[0]} - {a.pair[1]}" if a.pair else "slope"
        why = {"effect": "decided: CI excludes 0", "equivalent": "decided: within +-margin",
               "not_detected": "best - worst: CI covers 0"}[a.verdict]
        rows.append((f"{key}: {what}\n{a.verdict} ({why})", a.estimate, a.ci_low, a.ci_high, a.verdict))
    if analysis.epochs is not None and analysis.epochs.gain is not None:
        g = analysis.epochs.gain
        rows.append((f"train.epochs: last - base\n{analysis.epochs.verdict}", g.estimate, g.low, g.high,
                     analysis.epochs.verdict))
    if not rows:
        raise ValueError("no answer with a CI")
    y = np.arange(len(rows))
    for i, (_, est, low, high, verdict) in enumerate(rows):
        color = {"effect": RED, "equivalent": BLUE}.get(verdict, "black")
        ax.errorbar([est], [i], xerr=[[est - low], [high - est]], fmt="o", color=color, capsize=4)
    ax.axvline(0, color=GREY, lw=1)
    if analysis.margin and math.isfinite(analysis.margin):
        ax.axvspan(-analysis.margin, analysis.margin, color=BLUE, alpha=0.08, label="+-answers.margin")
        ax.legend(fontsize=8)
    ax.set_yticks(y, [row[0] for row in rows], fontsize=7)
    ax.set_xlabel("the contrast each verdict rests on, with its CI (red: effect; blue: equivalent; black: neither)")
    ax.set_title("the answers and their uncertainty (each CI at its look's error rate)", fontsize=10)


def pareto(ax, records: list[TrialRecord], analysis: Analysis) -> None:
    """Accuracy against the first cost: every trial, the front joined up, the infeasible grey, the champion ringed."""
    (metric, _), (cost, _) = analysis.objectives[0], analysis.objectives[1]
    done = [r for r in records if r.complete and r.values]
    feasible = [r for r in done if r.number not in analysis.infeasible]
    ax.scatter([r.values[1] for r in feasible], [r.values[0] for r in feasible], color=BLUE, alpha=0.5, s=22,
               label=f"trials (n={len(feasible)})")
    off = [r for r in done if r.number in analysis.infeasible]
    if off:
        ax.scatter([r.values[1] for r in off], [r.values[0] for r in off], color=GREY, marker="x",
                   label=f"beyond the constraints (n={len(off)})")
    front = sorted(analysis.front, key=lambda r: r.values[1])
    ax.plot([r.values[1] for r in front], [r.values[0] for r in front], "o-", color="black", label="Pareto front")
    for r in front:
        if r.number == analysis.champion:
            ax.scatter([r.values[1]], [r.values[0]], s=180, facecolors="none", edgecolors=RED, label="champion")
    ax.set_xlabel(cost)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {cost}")
    ax.legend(fontsize=8)

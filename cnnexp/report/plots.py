"""Plots that answer the question: score per value with 95% CIs and n, a chance line, learning curves.

Every plot uses the same trials as the tables (repeats are replicates like any other run);
pruned trials are drawn grey at their last reported score instead of being dropped.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from scipy import stats as st

GREY, BLUE, RED = "#9a9a9a", "#1f5fa8", "#b03030"


def plot_all(study: optuna.Study, frame: pd.DataFrame, effects: pd.DataFrame, facts: dict, params: list[str],
             folder: Path, metric: str = "val_accuracy", chance: float | None = 0.1, curves_of=None) -> list[Path]:
    """Write the plots; `curves_of` limits the learning curves to some trials (a design's main task)."""
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

    last = {t.number: t.intermediate_values[max(t.intermediate_values)] for t in study.trials
            if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values}
    for param in params:
        save(f"score_vs_{param.replace('/', '_')}.png",
             lambda ax, p=param: score_vs(ax, frame, p, metric, chance, last))
    save("learning_curves.png", lambda ax: learning_curves(ax, curves_of or study, metric, chance,
                                                           facts.get("epochs_band")))
    save("history.png", lambda ax: history(ax, study, metric, chance))
    save("importances.png", lambda ax: importances(ax, effects))
    return written


def score_vs(ax, frame: pd.DataFrame, param: str, metric: str, chance, pruned_last: dict) -> None:
    done = frame[frame["state"] == "COMPLETE"]
    values = sorted(frame[param].dropna().unique(), key=lambda v: (isinstance(v, str), v))
    position = {v: i for i, v in enumerate(values)}
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) for v in values)
    xs = (lambda s: s.astype(float)) if numeric else (lambda s: s.map(position))
    flagged = done["flag"].notna() if "flag" in done else pd.Series(False, index=done.index)
    ax.scatter(xs(done.loc[~flagged, param]), done.loc[~flagged, "objective"], color=BLUE, alpha=0.45, s=22,
               label="trials (each seed)")
    if flagged.any():
        ax.scatter(xs(done.loc[flagged, param]), done.loc[flagged, "objective"], color=RED, marker="x",
                   label="flagged: diverged or at chance (kept)")
    pruned = frame[frame["trial"].isin(pruned_last)]
    if len(pruned):
        ax.scatter(xs(pruned[param]), pruned["trial"].map(pruned_last), color=GREY, alpha=0.6, s=18,
                   label="pruned (last epoch reached)")
    groups = done.groupby(param)["objective"]
    means, counts = groups.mean(), groups.count()
    sds = groups.std(ddof=1)
    half = [st.t.ppf(0.975, n - 1) * s / math.sqrt(n) if n > 1 and s == s else np.nan for n, s in zip(counts, sds)]
    gx = [float(v) if numeric else position[v] for v in means.index]
    ax.errorbar(gx, means.values, yerr=np.array(half, dtype=float), fmt="o-", color="black", capsize=4,
                label="mean, 95% CI")
    for x, m, n in zip(gx, means.values, counts.values):
        ax.annotate(f"n={n}", (x, m), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if chance:
        ax.axhline(chance, color=RED, lw=1, ls="--", label=f"chance ({chance:g})")
    if numeric and all(float(v).is_integer() for v in values):
        ax.set_xticks([float(v) for v in values], [str(int(v)) for v in values])
    elif not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} (last epoch)")
    ax.set_title(f"{metric} vs {param}")
    ax.legend(fontsize=8)


def learning_curves(ax, study: optuna.Study, metric: str, chance, band: pd.DataFrame | None) -> None:
    drawn = False
    for t in study.trials:
        if not t.intermediate_values:
            continue
        epochs = sorted(t.intermediate_values)
        complete = t.state == optuna.trial.TrialState.COMPLETE
        ax.plot(epochs, [t.intermediate_values[e] for e in epochs], color=BLUE if complete else GREY,
                alpha=0.35 if complete else 0.5, lw=1)
        drawn = True
    if not drawn:
        raise ValueError("no trial reported an epoch")
    if band is not None and len(band):
        ax.fill_between(band["epoch"], band["ci_low"], band["ci_high"], color=BLUE, alpha=0.2,
                        label="mean of complete trials, 95% CI")
        ax.plot(band["epoch"], band["mean"], color="black", lw=2)
    if chance:
        ax.axhline(chance, color=RED, lw=1, ls="--", label=f"chance ({chance:g})")
    top = max(max(t.intermediate_values) for t in study.trials if t.intermediate_values)
    ax.set_xticks(range(1, top + 1))
    ax.plot([], [], color=GREY, label="pruned trials")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch")
    ax.legend(fontsize=8)


def history(ax, study: optuna.Study, metric: str, chance) -> None:
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ValueError("no complete trial")
    ax.scatter([t.number for t in done], [t.value for t in done], color=BLUE, s=22, label="complete")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
               color=GREY, s=18, label="pruned (last epoch reached)")
    best = np.maximum.accumulate([t.value for t in done])
    ax.step([t.number for t in done], best, where="post", color="black", label="best so far")
    if chance:
        ax.axhline(chance, color=RED, lw=1, ls="--", label=f"chance ({chance:g})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("optimisation history")
    ax.legend(fontsize=8)


def importances(ax, effects: pd.DataFrame) -> None:
    """Effect sizes with their 95% CIs: an importance chart that shows its own uncertainty."""
    rows = effects.reset_index(drop=True)
    y = np.arange(len(rows))
    estimate = rows["estimate"].astype(float)
    low, high = rows["ci_low"].astype(float), rows["ci_high"].astype(float)
    ax.errorbar(estimate, y, xerr=[estimate - low, high - estimate], fmt="o", color="black", capsize=4)
    ax.axvline(0, color=GREY, lw=1)
    ax.set_yticks(y, [f"{p}\n({v})" for p, v in zip(rows["parameter"], rows["verdict"])])
    ax.set_xlabel("effect on the score: best minus worst value (slope for continuous), 95% CI")
    unsettled = rows["verdict"].eq("insufficient_data").sum()
    title = "effect sizes"
    if unsettled or len(rows) == 0:
        title += f" — too few trials to trust for {unsettled} parameter(s)"
    ax.set_title(title, fontsize=10)

"""Report stage: does any of this have an effect on the score, how much, and at what cost?

    python -m cnnexp.report <study>   [--storage sqlite:///studies.db] [--out outputs/sweeps]

Writes `<sweep.output_dir>/<study>/`: `summary.md` (the answers first), `effects.csv` (one row
per searched parameter: verdict, estimate, 95% CI), `trials.csv` and `plots/`. Effects come from
one additive model over the searched parameters (`cnnexp.stats`), fitted on the complete trials;
repeats are genuine replicates and count as such, in the tables and the plots alike.

Flagged trials (a loss that exploded, a score at chance) are genuine outcomes of their settings
(a learning rate that is too high *is* an effect), so they stay in the model, but never silently:
the summary lists them and says which verdicts would change without them.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd

from cnnexp.console import table, wrap
from cnnexp.report import stats
from cnnexp.report.answers import answers
from cnnexp.sweep.study import best_trial
from cnnexp.tracking import runs

COLUMNS = {  # user attribute -> report column
    "seed": "seed", "repeat_of": "repeat_of", "test_accuracy": "test_accuracy", "test_loss": "test_loss",
    "epochs_run": "epochs", "train_seconds": "train_s", "params": "n_params", "flops_per_image": "flops",
    "flag": "flag", "error": "error", "pruned": "pruned", "dataset_note": "dataset_note",
}
EFFECT_COLUMNS = ["parameter", "verdict", "estimate", "ci_low", "ci_high", "n_min", "best_value"]


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial (repeats included, marked by `repeat_of`): params, scores, cost, state."""
    params = sorted({name for t in study.trials for name in t.params})
    rows = []
    for t in study.trials:
        row = {"trial": t.number, **{p: t.params.get(p) for p in params}, "state": t.state.name,
               "objective": t.value}
        row.update({column: t.user_attrs.get(attr) for attr, column in COLUMNS.items()})
        row["duration_s"] = round(t.duration.total_seconds(), 1) if t.duration else None
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["trial", *params, "state", "objective", *COLUMNS.values(), "duration_s"])
    for column in [*params, "seed", "repeat_of", "epochs", "n_params", "flops"]:
        # Integer values stay integers when some rows lack them (a design's MNIST arm has no kernel).
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.notna().any() and values.notna().sum() == frame[column].notna().sum() \
                and (values.dropna() % 1 == 0).all():
            frame[column] = values.astype("Int64")
    return frame.dropna(axis=1, how="all").reindex(columns=[c for c in frame.columns
                                                              if c in params or frame[c].notna().any()
                                                              or c in ("trial", "state", "objective", "test_accuracy")])


def analysable(frame: pd.DataFrame, without_flagged: bool = False) -> pd.DataFrame:
    """Complete trials: what the effects are estimated from (optionally without the flagged ones)."""
    keep = frame["state"] == "COMPLETE"
    if without_flagged and "flag" in frame:
        keep &= frame["flag"].isna()
    return frame[keep]


def learning_curves(study: optuna.Study) -> pd.DataFrame:
    """Validation score per epoch (columns 1..E) of every complete trial, NaN where it stopped."""
    curves = {t.number: t.intermediate_values for t in study.trials
              if t.state == optuna.trial.TrialState.COMPLETE and t.intermediate_values}
    frame = pd.DataFrame.from_dict(curves, orient="index")
    return frame.reindex(columns=sorted(frame.columns)) if not frame.empty else frame


def analyse(study: optuna.Study, frame: pd.DataFrame, params: list[str]) -> tuple[pd.DataFrame, dict]:
    """effects.csv's rows, plus the facts the answers need (noise, epochs curve)."""
    design = study.user_attrs.get("design")
    if design and "task" in params:
        return _analyse_design(study, frame, params, design)
    data = analysable(frame)
    effects = stats.effects(data, params, metric="objective",
                            log_scale={p for p in params if _is_log(study, p)})
    facts = {"residual_sd": effects.attrs.get("residual_sd"), "residual_df": effects.attrs.get("residual_df")}
    facts["noise"] = stats.replicate_noise(data, params, metric="objective", seed_column="seed")
    if "flag" in frame and frame["flag"].notna().any():
        robust = stats.effects(analysable(frame, without_flagged=True), params, metric="objective",
                               log_scale={p for p in params if _is_log(study, p)})
        facts["changed_without_flagged"] = [
            f"{a.parameter}: {a.verdict} -> {b.verdict}" for a, b in zip(effects.itertuples(), robust.itertuples())
            if a.verdict != b.verdict]
    curves = learning_curves(study)
    if "train.epochs" not in params and curves.shape[1:] and curves.shape[1] >= 2:
        band, row = stats.epoch_curve(curves)
        facts["epochs_band"] = band
        effects = pd.concat([effects, pd.DataFrame([{k: row.get(k) for k in effects.columns}])], ignore_index=True)
        facts["epochs_row"] = row
    return effects, facts


def _analyse_design(study, frame, params, design) -> tuple[pd.DataFrame, dict]:
    """A designed study: the main task's factors in one additive model; each arm against the baseline."""
    main = frame[frame["task"] == design["main"]]
    others = [p for p in params if p != "task"]
    main_study_trials = set(main["trial"])
    effects, facts = analyse(_Subset(study, main_study_trials), main, others)
    done = analysable(frame)
    baseline = done[(done["task"] == design["main"])]
    for key, value in design["baseline"].items():
        if key in baseline:
            baseline = baseline[baseline[key].map(lambda v, want=value: _same(v, want))]
    rows = []
    for arm in design["arms"]:
        scores = done.loc[done["task"] == arm, "test_accuracy"].dropna()
        row = stats.compare_two(scores.tolist(), baseline["test_accuracy"].dropna().tolist())
        row.update(parameter="task", best_value=arm if (row.get("estimate") or 0) > 0 else design["main"],
                   levels=f"{arm}: {scores.mean():.4f} (n={len(scores)}), {design['main']}: "
                          f"{baseline['test_accuracy'].mean():.4f} (n={len(baseline)})")
        rows.append(row)
        notes = frame.loc[frame["task"] == arm, "dataset_note"].dropna() if "dataset_note" in frame else []
        if len(notes):
            facts.setdefault("notes", []).append(notes.iloc[0])
    if rows:
        effects = pd.concat([effects, pd.DataFrame(rows).reindex(columns=effects.columns)], ignore_index=True)
    return effects, facts


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


class _Subset:
    """A study seen through some of its trials (a designed study's main task), for the learning curves."""

    def __init__(self, study: optuna.Study, numbers: set[int]):
        self._study, self._numbers = study, numbers

    @property
    def trials(self):
        return [t for t in self._study.trials if t.number in self._numbers]

    @property
    def user_attrs(self):
        return {}


def _is_log(study: optuna.Study, param: str) -> bool:
    for t in study.trials:
        dist = t.distributions.get(param)
        if dist is not None:
            return bool(getattr(dist, "log", False))
    return False


def write_report(study: optuna.Study, settings, parent: runs.Run | None = None) -> str:
    """Write summary.md, effects.csv, trials.csv and plots/; attach them to the parent run.

    Returns:
        The plain-text summary for the terminal (answers first, tables that fit 100 columns).
    """
    from cnnexp.report.plots import plot_all

    out = Path(str(settings.output_dir)) / study.study_name
    out.mkdir(parents=True, exist_ok=True)
    frame = trials_table(study)
    params = sorted({name for t in study.trials for name in t.params})
    effects, facts = analyse(study, frame, params)
    frame.to_csv(out / "trials.csv", index=False)
    effects_out = effects[EFFECT_COLUMNS + [c for c in effects.columns if c not in EFFECT_COLUMNS]]
    effects_out.to_csv(out / "effects.csv", index=False)
    design = study.user_attrs.get("design")
    main_task = _Subset(study, set(frame.loc[frame["task"] == design["main"], "trial"])) \
        if design and "task" in frame else None
    plots = plot_all(study, frame, effects, facts, params, out / "plots", metric=str(settings.metric),
                     curves_of=main_task)

    metric = str(settings.metric)
    best = best_trial(study)
    if design:  # the best of the main task: an arm (MNIST) scores on another dataset, not comparable
        main_done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                     and t.params.get("task") == design["main"]]
        best = max(main_done, key=lambda t: t.value, default=None) if settings.direction == "maximize" else \
            min(main_done, key=lambda t: t.value, default=None)
    said = answers(study, frame, effects, facts, metric)
    main = frame[frame["repeat_of"].isna()] if "repeat_of" in frame else frame
    counts = main["state"].value_counts().to_dict()
    n_repeats = len(frame) - len(main)
    flagged = frame[frame["flag"].notna()] if "flag" in frame else frame.iloc[:0]
    ui = study.user_attrs.get("mlflow_ui_url")
    lines = [f"# Study `{study.study_name}`: {metric} ({settings.direction})", "", *said, "",
             f"Trials: {len(main)} of {settings.n_trials} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
             + (f", plus {n_repeats} repeat(s) with other seeds" if n_repeats else "")
             + f"; storage `{settings.storage}`." + (f" MLflow: {ui}" if ui else ""), ""]
    noise, groups, dof = facts["noise"]
    lines.append("Seed noise: " + (f"sd {noise:.4f} of {metric} from {groups} configuration(s) run with several "
                                   f"seeds ({dof} degrees of freedom)" if noise is not None else
                                   "no configuration was run with two seeds yet (sweep.repeats=N measures it)")
                 + (f"; the model's residual sd is {facts['residual_sd']:.4f} on {facts['residual_df']} df."
                    if facts.get("residual_sd") is not None and math.isfinite(facts["residual_sd"]) else "."))
    if len(flagged):
        changed = facts.get("changed_without_flagged") or []
        lines += ["", f"Flagged runs ({len(flagged)}), kept in the effects as genuine outcomes of their settings: "
                  + "; ".join(f"trial {r.trial}: {r.flag}" for r in flagged.itertuples()) + ". Without them "
                  + ("these verdicts would change: " + ", ".join(changed) if changed else "no verdict changes") + "."]
    lines += ["", "## Effects (additive model over the searched parameters, 95% CI, Tukey-adjusted across levels)",
              "", _markdown(effects_out), ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {metric}={best.value:.4f}, "
                  f"test_accuracy={best.user_attrs.get('test_accuracy', float('nan')):.4f}, params {best.params}.",
                  f"Reproduce: `{best.user_attrs.get('command', '')}`", ""]
    lines += ["## Trials", "", _markdown(frame.drop(columns=["error"], errors="ignore")), "",
              "Plots: " + ", ".join(p.name for p in plots), ""]
    (out / "summary.md").write_text("\n".join(lines))

    if parent is not None and parent.active:
        for path in (out / "trials.csv", out / "effects.csv", out / "summary.md"):
            parent.log_artifact(path)
        for path in plots:
            parent.log_artifact(path, "plots")
        parent.log_metrics({f"trials_{k.lower()}": v for k, v in counts.items()})
        if best is not None:
            parent.log_metrics({f"best_{metric}": best.value,
                                "best_test_accuracy": best.user_attrs.get("test_accuracy", float("nan"))})
            parent.set_tags({"cnnexp.best_trial": best.number, "cnnexp.best_run_id": best.user_attrs.get("mlflow_run_id"),
                             "cnnexp.best_registered_version": best.user_attrs.get("registered_version")})
        if noise is not None:
            parent.log_metrics({"seed_noise_sd": noise})
    return terminal_summary(said, effects_out, out)


def terminal_summary(said: list[str], effects: pd.DataFrame, out: Path) -> str:
    """What the terminal shows at the end: the answers, then the effects as a plain table."""
    rows = effects.to_dict("records")
    columns = ["parameter", "verdict", "estimate", "ci_low", "ci_high", "n_min", "best_value"]
    return "\n".join([wrap("\n".join(said)), "", table(rows, columns, width=100), "",
                      f"Report: {out / 'summary.md'} (effects.csv, trials.csv, plots/ beside it)"])


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else (f"{v:.0f}" if float(v).is_integer()
                                                                                and abs(v) >= 100 else f"{v:.4g}"))
    shown = shown.astype(object).where(shown.notna(), "")
    return shown.astype(str).replace({"nan": "", "<NA>": "", "None": ""}).to_markdown(index=False)

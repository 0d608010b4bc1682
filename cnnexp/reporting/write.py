"""Report stage: the answers, their tables and plots, written for a finished (or running) study.

Writes `<sweep.output_dir>/<study>/`: `summary.md` (the answers first), `effects.csv` (one row per
question: verdict, estimate, CI, the error rate it holds at, the detectable effect, runs and
seconds spent), `trials.csv` and `plots/`. The folder is written beside and swapped in whole, so a
report is either complete or the previous one (an interrupted write leaves no half report).
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from cnnexp import record
from cnnexp.console import table, wrap
from cnnexp.errors import CnnexpError
from cnnexp.reporting.analysis import Analysis, analyse
from cnnexp.reporting.plots import plot_all
from cnnexp.reporting.prose import cell_n, label, pts, to_settle
from cnnexp.reporting.sections import answer_paragraphs, transfer_lines
from cnnexp.tracking import runs, store

EFFECT_COLUMNS = ["question", "parameter", "verdict", "decided_by", "higher", "lower", "estimate", "ci_low", "ci_high",
                  "alpha", "n_min", "best_value", "bound", "mde", "p_value", "settled_at_look", "confirmed", "runs",
                  "failed", "seconds", "to_settle"]


def effect_rows(analysis: Analysis) -> list[dict]:
    """One row per question (effects.csv), in the questions' order: an effect's row carries its named pair's CI."""
    rows = []
    finished = bool(analysis.looks) and analysis.looks[-1].final
    for key, a in analysis.factors.items():
        seconds = analysis.seconds.get(key, float("nan"))
        runs_used = sum(cell_n(lv) for lv in a.levels)
        higher, lower = a.pair or (None, None)
        by_failures = a.verdict == "effect" and not a.decisive  # the failure rate differs, not the accuracy
        rows.append({"question": label(analysis, key), "parameter": key, "verdict": a.verdict,
                     "decided_by": "failure rate" if by_failures else "accuracy", "higher": higher,
                     "lower": lower, "estimate": a.estimate, "ci_low": a.ci_low, "ci_high": a.ci_high, "alpha": a.alpha,
                     "n_min": min((cell_n(lv) for lv in a.levels), default=0), "best_value": a.best, "bound": a.bound,
                     "mde": a.mde, "p_value": a.p_value, "settled_at_look": analysis.settled_at.get(key),
                     "confirmed": (analysis.confirmations.get(key) or {}).get("verdict"),
                     "runs": runs_used, "failed": sum(lv.failed for lv in a.levels), "seconds": seconds,
                     "to_settle": "" if a.settled() else to_settle(a, analysis.margin or 0.0,
                                                                    seconds / max(runs_used, 1), finished)})
    e = analysis.epochs
    if e is not None:
        g = e.gain
        rows.append({"question": label(analysis, "train.epochs"), "parameter": "train.epochs", "verdict": e.verdict,
                     "decided_by": "the gain over the base epochs",
                     "estimate": g.estimate if g else math.nan, "ci_low": g.low if g else math.nan,
                     "ci_high": g.high if g else math.nan, "alpha": g.alpha if g else math.nan, "n_min": e.runs,
                     "best_value": f">={e.last_epoch}" if e.at_or_beyond else e.best_epoch,
                     "settled_at_look": analysis.settled_at.get("train.epochs"), "runs": e.runs,
                     "seconds": analysis.seconds.get("train.epochs", math.nan)})
    for arm, i in analysis.measured.items():
        rows.append({"question": label(analysis, arm), "parameter": "task", "verdict": "measured",
                     "estimate": i.estimate, "ci_low": i.low, "ci_high": i.high, "alpha": i.alpha, "n_min": i.n,
                     "best_value": arm, "settled_at_look": analysis.settled_at.get(arm), "runs": i.n,
                     "seconds": analysis.seconds.get(arm, math.nan)})
    return rows


def inconsistent(effects: pd.DataFrame, margin: float) -> list[str]:
    """Rows whose words contradict their numbers: an `effect` whose CI covers 0, an `equivalent` whose CI leaves
    +-margin. The tests run this on every report they write."""
    bad = []
    for row in effects.to_dict("records"):
        low, high = row.get("ci_low"), row.get("ci_high")
        if (row["verdict"] == "effect" and row.get("decided_by") != "failure rate" and pd.notna(low)
                and low <= 0 <= high):
            bad.append(f"{row['parameter']}: effect, but its CI {low:.4f} to {high:.4f} covers 0")
        if row["verdict"] == "equivalent" and pd.notna(low) and max(abs(low), abs(high)) >= margin:
            bad.append(f"{row['parameter']}: equivalent, but its CI {low:.4f} to {high:.4f} leaves +-{margin}")
    return bad


def trials_table(records: list[record.TrialRecord]) -> pd.DataFrame:
    params = sorted({name for r in records for name in r.params})
    columns = ["seed", "round", "repeat_of", "test_accuracy", "epochs_run", "train_images", "updates", "duration_s",
               "num_params", "flops", "flag", "pruned", "error", "dataset_note"]
    rows = [{"trial": r.number, **{p: r.params.get(p) for p in params}, "state": r.state, "objective": r.value,
             **{c: getattr(r, c) for c in columns}} for r in records]
    frame = pd.DataFrame(rows, columns=["trial", *params, "state", "objective", *columns])
    return frame.dropna(axis=1, how="all")


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else (
                f"{v:.0f}" if float(v).is_integer() and abs(v) >= 100 else f"{v:.4g}"))
    return shown.astype(object).where(shown.notna(), "").astype(str).replace(
        {"nan": "", "<NA>": "", "None": ""}).to_markdown(index=False)


def _study_lines(study: optuna.Study, records, facts: record.StudyRecord, analysis: Analysis, settings) -> list[str]:
    """Trials, time against the plan, noise, failures and the looks."""
    done = [r for r in records if r.duration_s]
    trained = sum(r.duration_s for r in done)
    starts = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start]
    ends = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    counts = pd.Series([r.state for r in records]).value_counts().to_dict() if records else {}
    lines = [f"Trials: {len(records)} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
             f"{trained / 60:.1f} min of training, {wall / 60:.1f} min of wall time; storage `{settings.storage}`."
             + (f" MLflow: {facts.mlflow_ui_url}" if facts.mlflow_ui_url else "")]
    predicted = sum(r.predicted_s for r in done if r.predicted_s)
    if facts.plan and predicted:
        lines.append(f"Time: planned {facts.plan.budget_s / 60:.0f} min (sweep.budget); the planner predicted "
                     f"{predicted / 60:.1f} min for the trials that ran, they took {trained / 60:.1f} min "
                     f"({trained / predicted - 1:+.0%}).")
    if math.isfinite(analysis.training_share):
        lines.append(f"Wall: {analysis.wall_s / 60:.1f} min from the study's start (its plan's timing included) to "
                     f"this report, {analysis.training_share:.0%} of it in training steps (the epochs' own seconds, "
                     "validation taken out).")
    lines += _noise_lines(analysis)
    if analysis.failed:
        lines.append(f"Failed runs ({len(analysis.failed)}), counted per value and kept out of the accuracy model: "
                     + "; ".join(f"trial {r.number} ({r.params}): {r.flag or r.error}" for r in analysis.failed) + ".")
    if analysis.looks:
        lines += ["", "Looks (each with its share of the error rate):", ""]
        lines += [f"- look {entry.round}: error rate {entry.alpha:.4f}, {entry.seconds_spent / 60:.1f} min spent"
                  + (f", undecided: {', '.join(entry.undecided)}" if entry.undecided else ", everything settled")
                  + (" (last)" if entry.final else "") for entry in analysis.looks]
    return lines


def _noise_lines(analysis: Analysis) -> list[str]:
    noise = analysis.noise
    if not math.isfinite(noise.sd):
        return []
    text = (f"Noise: SD {pts(noise.sd, False)} points between runs of one configuration ({noise.df} df). Each run "
            "draws its own initialisation, data order and training subset, so the three are in every CI together "
            "(this study can't tell them apart: `python benchmarks/noise_sources.py` measures each); of that SD, each "
            f"run's own right/wrong on its {analysis.regime.eval_images or 0:,} evaluation images is about "
            f"{pts(noise.binomial_sd, False)} (binomial).")
    if math.isfinite(noise.eval_sd):
        text += (f" The evaluation images' luck that every run of a configuration shares (measured, paired by image) "
                 f"adds SD {pts(noise.eval_sd, False)} points to a contrast of two configurations whose runs give "
                 f"{pts(noise.contrast_sd, False)}: it is in every CI.")
    return [text]


def _per_cell(analysis: Analysis) -> list[str]:
    cells = analysis.noise.per_cell
    if not cells:
        return []
    frame = pd.DataFrame(cells, columns=["cell", "n", "sd"]).assign(sd=lambda f: 100 * f["sd"])
    return ["", "Per-cell SD (points), a diagnostic: a cell far above the others is noisier, and its comparisons "
                "are wider (the model gives each cell its own variance).", "", _markdown(frame)]


def write_report(study: optuna.Study, settings, answers_cfg, compare: tuple[str, Analysis] | None = None,
                 tracking_uri: str | None = None) -> str:
    """Write the report folder (swapped in whole); with `tracking_uri` (the user's, never one the studies file
    names) attach it to the study's parent run there. Returns the terminal text."""
    records, facts = record.read_trials(study), record.read_study(study)
    analysis = analyse(study, records, facts, answers_cfg)
    final = Path(str(settings.output_dir)) / study.study_name
    staging = final.with_name(f".{study.study_name}.writing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        effects = pd.DataFrame(effect_rows(analysis), columns=EFFECT_COLUMNS)
        effects.to_csv(staging / "effects.csv", index=False)
        trials_table(records).to_csv(staging / "trials.csv", index=False)
        main = facts.design.main if facts.design else None
        classes = [r.num_classes for r in records if r.num_classes and r.params.get("task") in (None, main)]
        plots = plot_all(records, analysis, staging / "plots", 1 / int(np.median(classes)) if classes else None)
        tests = {arm: int(np.median([r.test_images for r in records if r.params.get("task") == arm and r.test_images]
                                    or [0])) for arm in analysis.measured}
        said = answer_paragraphs(analysis, tests) + (transfer_lines(analysis, *compare) if compare else [])
        lines = [f"# Study `{study.study_name}`: {facts.metric} ({facts.direction})", "", *said,
                 *_study_lines(study, records, facts, analysis, settings), *_per_cell(analysis), "",
                 "## Questions (effects.csv)", "", _markdown(effects), "", *_best(study, facts),
                 "## Trials", "",  # the regime line above already names the data; trials.csv keeps it per trial
                 _markdown(trials_table(records).drop(columns=["error", "dataset_note"], errors="ignore")), "",
                 "Plots: " + ", ".join(p.name for p in plots), ""]
        (staging / "summary.md").write_text("\n".join(lines))
        _swap(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    attached = _attach(study, facts, final, analysis, tracking_uri)
    rows = effects.to_dict("records")
    return "\n".join([wrap("\n".join(said)), "", table(rows, ["parameter", "verdict", "estimate", "ci_low", "ci_high",
                                                               "n_min", "best_value"], width=100), "",
                      f"Report: {final / 'summary.md'} (effects.csv, trials.csv, plots/ beside it)"
                      + ("" if attached else "; local only (give --tracking-uri or MLFLOW_TRACKING_URI to attach it to "
                                             "the study's MLflow run)")])


def _best(study: optuna.Study, facts: record.StudyRecord) -> list[str]:
    best = record.best_trial(study, facts.design.main if facts.design else None)
    if best is None:
        return []
    facts_best = record.read_trial(best)
    return [f"Best: trial {best.number}, {facts.metric}={best.values[0]:.4f}, test_accuracy="
            f"{facts_best.test_accuracy or float('nan'):.4f}, params {best.params}.",
            f"Reproduce: `{facts_best.command}`", ""]


def _swap(staging: Path, final: Path) -> None:
    """Replace the report folder in two renames: a reader sees the old report or the new one, never half."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _attach(study: optuna.Study, facts: record.StudyRecord, folder: Path, analysis: Analysis,
            uri: str | None) -> bool:
    """The report, the best trial and the counts on the study's MLflow parent run in `uri`; False: not attached."""
    if not (facts.mlflow_parent_run_id and uri):
        return False
    try:
        store.check(uri)  # never an Optuna file or a store that can't be written: the report stays local then
        store.use(uri)
    except CnnexpError as err:
        warnings.warn(f"The report is not attached to MLflow: {err}", stacklevel=2)
        return False
    parent = runs.Run(facts.mlflow_parent_run_id)
    for name in ("trials.csv", "effects.csv", "summary.md"):
        parent.log_artifact(folder / name)
    for path in sorted((folder / "plots").glob("*.png")):
        parent.log_artifact(path, "plots")
    if math.isfinite(analysis.noise.sd):
        parent.log_metrics({"seed_noise_sd": analysis.noise.sd})
    parent.set_tags({f"cnnexp.answer.{p}": a.verdict for p, a in analysis.factors.items()})
    states = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts().to_dict()
    parent.log_metrics({f"trials_{state.lower()}": count for state, count in states.items()})
    best = record.best_trial(study, facts.design.main if facts.design else None)
    if best is not None:
        facts_best = record.read_trial(best)
        parent.log_metrics({f"best_{facts.metric}": best.values[0], "best_test_accuracy": facts_best.test_accuracy})
        parent.set_tags({"cnnexp.best_trial": best.number, "cnnexp.best_run_id": facts_best.mlflow_run_id,
                         "cnnexp.best_registered_version": facts_best.registered_version})
    return parent.active

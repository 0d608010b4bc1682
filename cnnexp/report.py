"""Report stage: does any of this have an effect on the score? Tables, plots and a short answer.

    python -m cnnexp.report <study>   [--storage sqlite:///studies.db] [--out outputs/sweeps]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

COLUMNS = {  # trials_dataframe column -> report column
    "number": "trial", "state": "state", "value": "objective", "user_attrs_test_accuracy": "test_accuracy",
    "user_attrs_test_loss": "test_loss", "user_attrs_epochs_run": "epochs_run",
    "user_attrs_train_seconds": "train_s", "user_attrs_repeat_of": "repeat_of", "user_attrs_seed": "seed",
    "user_attrs_error": "error",
}


def trials_table(study: optuna.Study, repeats: optuna.Study | None = None) -> pd.DataFrame:
    """One row per trial (repeats included, marked by `repeat_of`): params, scores, epochs, time, state."""
    frames = [s.trials_dataframe(attrs=("number", "value", "duration", "params", "user_attrs", "state"))
              for s in (study, repeats) if s is not None and s.trials]
    if not frames:
        return pd.DataFrame(columns=["trial", "state", "objective"])
    frames[0]["user_attrs_repeat_of"] = frames[0].get("user_attrs_repeat_of", pd.NA)
    if len(frames) > 1:  # repeats are numbered in a study of their own: r0, r1, ...
        frames = [frames[0].astype({"number": object}), frames[1].assign(number="r" + frames[1]["number"].astype(str))]
    table = pd.concat(frames, ignore_index=True)
    params = sorted(c for c in table.columns if c.startswith("params_"))
    table["duration_s"] = table["duration"].dt.total_seconds().round(1)
    keep = [c for c in COLUMNS if c in table.columns]
    table = table[keep[:1] + params + keep[1:] + ["duration_s"]]
    table = table.rename(columns={**COLUMNS, **{p: p.removeprefix("params_") for p in params}})
    table["state"] = table["state"].astype(str)
    return table


def seed_noise(table: pd.DataFrame, params: list[str]) -> tuple[float | None, int]:
    """Pooled standard deviation of the objective over configurations trained more than once.

    Sources: `sweep.repeats` (same configuration, other seeds) and configurations a sampler
    happened to draw twice. Returns (sigma, number of such configurations).
    """
    done = table[table["state"] == "COMPLETE"]
    if done.empty or not params:
        return None, 0
    # Repeats carry the parameters of the trial they repeat, so grouping by parameters covers both.
    variances = [g["objective"].var(ddof=1) for _, g in done.groupby(params, dropna=False) if len(g) > 1]
    if not variances:
        return None, 0
    return float(math.sqrt(float(np.mean(variances)))), len(variances)


def effects(table: pd.DataFrame, params: list[str], noise: float | None) -> pd.DataFrame:
    """Per parameter: mean objective per value (numeric ones binned), effect size and a verdict."""
    done = table[(table["state"] == "COMPLETE") & table.get("repeat_of", pd.Series(pd.NA, index=table.index)).isna()]
    rows = []
    for param in params:
        values = done[param]
        if pd.api.types.is_numeric_dtype(values) and values.nunique() > 6:
            values = pd.qcut(values, 3, duplicates="drop").astype(str)
        groups = done.groupby(values, dropna=False, observed=True)["objective"].agg(["mean", "count"])
        if len(groups) < 2:
            rows.append({"parameter": param, "means": _fmt_means(groups), "effect": float("nan"),
                         "verdict": "only one value tried: no answer"})
            continue
        effect = float(groups["mean"].max() - groups["mean"].min())
        best, worst = groups["mean"].idxmax(), groups["mean"].idxmin()
        if noise is None:
            verdict = "seed noise unknown (run with sweep.repeats=2 to measure it)"
        else:
            # Standard error of the difference between the best and the worst value's means.
            margin = 2 * noise * math.sqrt(1 / groups.loc[best, "count"] + 1 / groups.loc[worst, "count"])
            if effect > margin:
                verdict = f"yes: larger than seed noise ({effect:.3f} > 2 SE = {margin:.3f}); best at {best}"
            else:
                verdict = f"not distinguishable from seed noise ({effect:.3f} <= 2 SE = {margin:.3f})"
        rows.append({"parameter": param, "means": _fmt_means(groups), "effect": effect, "verdict": verdict})
    return pd.DataFrame(rows, columns=["parameter", "means", "effect", "verdict"])


def _fmt_means(groups: pd.DataFrame) -> str:
    return ", ".join(f"{idx}: {row['mean']:.3f} (n={int(row['count'])})" for idx, row in groups.iterrows())


# --------------------------------------------------------------------------------------------
# Plots


def plot_all(study: optuna.Study, table: pd.DataFrame, params: list[str], folder: Path) -> list[Path]:
    """History, importances, objective vs each parameter, parallel coordinates, learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name, make):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's matplotlib plots are "experimental"
                result = make()
            figure = result.figure if hasattr(result, "figure") else np.ravel(result)[0].figure
            figure.set_size_inches(max(figure.get_size_inches()[0], 7), max(figure.get_size_inches()[1], 4.5))
            figure.tight_layout()
            figure.savefig(folder / name, dpi=110)
            plt.close(figure)
            written.append(folder / name)
        except Exception as err:  # noqa: BLE001 - e.g. importances need 2+ complete trials
            warnings.warn(f"plot {name} skipped: {err}", stacklevel=2)
            plt.close("all")

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    save("history.png", lambda: ovm.plot_optimization_history(study))
    if len(complete) >= 2 and len(params) >= 1:
        save("importances.png", lambda: ovm.plot_param_importances(study))
    if complete:
        save("parallel_coordinates.png", lambda: ovm.plot_parallel_coordinate(study))
        save("learning_curves.png", lambda: ovm.plot_intermediate_values(study))
    done = table[table["state"] == "COMPLETE"]
    for param in params:
        save(f"score_vs_{param.replace('/', '_')}.png", lambda p=param: _score_vs(done, p))
    return written


def _score_vs(done: pd.DataFrame, param: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = done[param]
    categorical = not pd.api.types.is_numeric_dtype(x)
    if categorical:
        order = sorted(x.astype(str).unique())
        position = {v: i for i, v in enumerate(order)}
        xs = x.astype(str).map(position)
        ax.set_xticks(range(len(order)), order)
    else:
        xs = x
    ax.scatter(xs, done["objective"], label="objective (validation)", alpha=0.8)
    if "test_accuracy" in done:
        ax.scatter(xs, done["test_accuracy"], marker="x", label="test accuracy", alpha=0.8)
    means = done.groupby(xs)["objective"].mean().sort_index()
    ax.plot(means.index, means.values, color="grey", lw=1, label="mean per value")
    ax.set_xlabel(param)
    ax.set_ylabel("score")
    ax.set_title(f"score vs {param}")
    ax.legend()
    return ax


# --------------------------------------------------------------------------------------------
# The whole report


def load_repeats(study: optuna.Study, storage) -> optuna.Study | None:
    name = f"{study.study_name}.repeats"
    if name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


def write_report(study: optuna.Study, settings, parent_run_id: str | None = None) -> Path:
    """Write trials.csv, trials.md, summary.md and plots/ for the study; attach them to the parent run.

    Returns:
        The path of summary.md.
    """
    out = Path(str(settings.output_dir)) / study.study_name
    out.mkdir(parents=True, exist_ok=True)
    repeats = load_repeats(study, study._storage)
    table = trials_table(study, repeats)
    params = sorted({name for t in study.trials for name in t.params})
    noise, groups = seed_noise(table, params)
    answer = effects(table, params, noise)
    table.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    plots = plot_all(study, table, params, out / "plots")

    main = table[table.get("repeat_of", pd.Series(pd.NA, index=table.index)).isna()]
    counts = main["state"].value_counts().to_dict()
    n_repeats = len(table) - len(main)
    metric = settings.metric
    lines = [f"# Study `{study.study_name}`: {metric} ({settings.direction})", "",
             f"Trials: {len(study.trials)} of {settings.n_trials} "
             f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
             + (f", plus {n_repeats} repeat(s) with other seeds" if n_repeats else "")
             + f"; storage `{settings.storage}`.", ""]
    best = next(iter(sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                            key=lambda t: t.value, reverse=settings.direction == "maximize")), None)
    if best is not None:
        lines += [f"Best: trial {best.number}, {metric}={best.value:.4f}, "
                  f"test_accuracy={best.user_attrs.get('test_accuracy', float('nan')):.4f}, params {best.params}.",
                  f"Reproduce: `{best.user_attrs.get('command', '')}`", ""]
    lines += ["Seed noise: " + (f"sigma={noise:.4f} of {metric}, from {groups} configuration(s) trained more than once."
                                if noise is not None else "unknown (no configuration trained twice; use sweep.repeats=N)."),
              "", "## Does it have an effect on the score?", "",
              "Marginal means of the objective per value (numeric values in 3 bins); other searched "
              "parameters vary too, so read effects in multi-parameter studies as indications.", "",
              answer.to_markdown(index=False, floatfmt=".4f") if not answer.empty else "(no parameters)", "",
              "## Trials", "", table.to_markdown(index=False, floatfmt=".4f"), "",
              "Plots: " + ", ".join(p.name for p in plots), ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))

    if parent_run_id:
        import mlflow

        from cnnexp.tracking import Run

        if study.user_attrs.get("mlflow_tracking_uri"):
            mlflow.set_tracking_uri(study.user_attrs["mlflow_tracking_uri"])
        run = Run(parent_run_id)
        for path in (out / "trials.csv", out / "trials.md", summary):
            run.log_artifact(path)
        for path in plots:
            run.log_artifact(path, "plots")
        finished = {k.lower(): v for k, v in counts.items()}
        run.log_metrics({f"trials_{k}": v for k, v in finished.items()}
                        | ({f"best_{metric}": best.value} if best else {})
                        | ({"seed_noise_sigma": noise} if noise is not None else {}))
    return summary


def main(argv=None) -> int:
    from omegaconf import OmegaConf

    from cnnexp.sweep import DEFAULTS, make_storage

    parser = argparse.ArgumentParser(prog="python -m cnnexp.report", description="Report on an Optuna study.")
    parser.add_argument("study", help="the study name (a sweep's study_name, by default the sweep file's name)")
    parser.add_argument("--storage", default=DEFAULTS["sweep"]["storage"])
    parser.add_argument("--out", default=DEFAULTS["sweep"]["output_dir"])
    args = parser.parse_args(argv)
    storage = make_storage(args.storage)
    if args.study not in optuna.get_all_study_names(storage):
        print(f"error: no study {args.study!r} in {args.storage}; studies there: "
              f"{', '.join(optuna.get_all_study_names(storage)) or 'none'}", file=sys.stderr)
        return 2
    study = optuna.load_study(study_name=args.study, storage=storage)
    settings = OmegaConf.create({**DEFAULTS["sweep"], "study_name": args.study, "storage": args.storage,
                                 "output_dir": args.out, "direction": study.direction.name.lower(),
                                 "n_trials": len(study.trials),
                                 "metric": study.user_attrs.get("metric", DEFAULTS["sweep"]["metric"])})
    summary = write_report(study, settings, parent_run_id=study.user_attrs.get("mlflow_parent_run_id"))
    print(summary.read_text())
    print(f"Report: {summary} (and trials.csv, trials.md, plots/ beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

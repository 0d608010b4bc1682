"""Does a hyperparameter have an effect on the score? The statistics behind the report's answer.

One additive OLS model over all searched parameters that vary estimates each parameter's effect
adjusted for the others (a sampler rarely balances them). A categorical parameter's effect is its
best-minus-worst level, with a Tukey-Kramer simultaneous CI: the pair is picked *after* seeing the
data, so the CI must hold for all k(k-1)/2 pairs at once. A numeric parameter with many values is a
slope. Every answer is one of three verdicts, and `needed` says what would settle an open one.

Pure: numpy, pandas, scipy and statsmodels only.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats

VERDICTS = ("effect", "not_detected", "insufficient_data")
COLUMNS = ["parameter", "verdict", "estimate", "ci_low", "ci_high", "n_min", "best_value", "p_value", "levels", "needed"]
POWER = 0.80  # the power that `needed` quotes a minimal detectable effect at
MAX_CATEGORICAL_LEVELS = 6  # a numeric parameter with more distinct values is a slope, not a factor
NAN = float("nan")


def _row(parameter: str, verdict: str, needed: str, **values) -> dict:
    base = {"parameter": parameter, "verdict": verdict, "needed": needed, "best_value": None, "levels": ""}
    return dict.fromkeys(COLUMNS, NAN) | base | values


def _sorted(values: list) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types, e.g. 3 and "auto"
        return sorted(values, key=str)


def _plain(value):
    """A numpy scalar as the Python value it holds (for tables and JSON)."""
    return value.item() if isinstance(value, np.generic) else value


def _mde(critical: float, df: float, se: float) -> float:
    """Smallest true effect found with probability POWER: it must clear the critical value by t_POWER SEs."""
    return (critical + stats.t.ppf(POWER, df)) * se


def effects(table: pd.DataFrame, params: list[str], metric: str = "objective", alpha: float = 0.05,
            min_residual_df: int = 2, continuous: set[str] | None = None,
            log_scale: set[str] | None = None) -> pd.DataFrame:
    """Effect of each searched parameter on `metric`, adjusted for the others, with a verdict.

    Args:
        table: One row per finished trial; columns are the parameters and `metric`. Rows with equal
            parameters are replicates with different seeds (never identical reruns).
        params: The searched parameter names; the result has one row per name, in this order.
        metric: The score column; higher is better.
        alpha: 1 - confidence level of the CIs (simultaneous over a factor's levels).
        min_residual_df: Fewer residual degrees of freedom than this leave the noise unmeasured.
        continuous: Parameters to fit as a slope even with few distinct values.
        log_scale: Continuous parameters whose slope is per decade (log10 of the value).

    Returns:
        A frame with `COLUMNS`; `attrs` holds `residual_sd`, `residual_df` and `n` of the model.
        Rows with a missing parameter value are left out (the parameter did not apply to them).
    """
    continuous, log_scale = set(continuous or ()), set(log_scale or ())
    # A missing column reads as all-NaN: no data for that parameter (or no data at all for the metric).
    data = table.reindex(columns=[*dict.fromkeys(params), metric])
    data = data[data[metric].notna()]
    varying = [p for p in dict.fromkeys(params) if data[p].nunique() > 1]
    data = data.dropna(subset=varying) if data[varying].isna().to_numpy().any() else data
    varying = [p for p in varying if data[p].nunique() > 1]

    kinds: dict[str, str] = {}
    columns = {metric: data[metric].to_numpy(dtype=float)}  # the model's data frame, built in one go
    levels: dict[str, list] = {}
    for p in varying:
        column = data[p]
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        if p in continuous or (numeric and column.nunique() > MAX_CATEGORICAL_LEVELS):
            # log10 needs positive values: fall back to per-unit rather than fail the whole model
            kinds[p] = "log" if p in log_scale and (column > 0).all() else "linear"
            columns[p] = np.log10(column.to_numpy(dtype=float)) if kinds[p] == "log" else column.to_numpy(dtype=float)
        else:
            # Recode levels as L0, L1, ... so coefficient names are predictable whatever the values
            # (floats, bools, strings with brackets); L0 (the smallest) is the Treatment reference.
            kinds[p], levels[p] = "categorical", _sorted(column.drop_duplicates().tolist())
            codes = pd.Index(levels[p], dtype=object).get_indexer(column.astype(object))
            columns[p] = pd.Categorical.from_codes(codes, [f"L{i}" for i in range(len(levels[p]))])
    design = pd.DataFrame(columns, index=data.index)

    terms = [f'C(Q("{p}"))' if kinds[p] == "categorical" else f'Q("{p}")' for p in varying]
    n_coef = 1 + sum(len(levels[p]) - 1 if p in levels else 1 for p in varying)
    fit, problem = None, ""
    if len(data) < n_coef + min_residual_df:
        runs = n_coef + min_residual_df - len(data)
        problem = f"{runs} more run{'s' * (runs > 1)} (any configuration) for residual degrees of freedom"
    if len(data) >= n_coef:  # the point estimates exist even when the noise can't be measured yet
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")  # df_resid = 0 divides by zero in the scale
                fit = smf.ols(f'Q("{metric}") ~ ' + (" + ".join(terms) or "1"), data=design).fit()
            if fit.model.rank < fit.model.exog.shape[1]:
                fit, problem = None, "parameters are confounded in this design: vary them independently (e.g. a grid)"
        except Exception as err:  # noqa: BLE001 - any fitting failure is an answer, not a crash
            fit, problem = None, f"the model could not be fitted ({err})"
    residual_df = int(fit.df_resid) if fit is not None else 0
    measured = fit is not None and not problem  # enough residual df for standard errors

    rows = []
    for p in params:
        if p not in kinds:
            tried = data[metric][data[p].notna()]
            values = data.loc[tried.index, p].drop_duplicates().tolist()
            where = f"only {p}={values[0]} tried" if values else "no finished trials"
            text = f"{values[0]}: {tried.mean():.3f} (n={len(tried)})" if values else ""
            rows.append(_row(p, "insufficient_data", f"{where}: try at least 2 values", n_min=len(tried),
                             best_value=values[0] if values else None, levels=text))
        elif kinds[p] == "categorical":
            rows.append(_categorical(p, levels[p], design, fit, measured, problem, alpha, metric))
        else:
            rows.append(_slope(p, kinds[p], data[p], fit, measured, problem, alpha))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    # Left to pandas, best_value 1 next to 1.5 would become 1.0: keep each as the value that was searched.
    frame["best_value"] = pd.Series([r["best_value"] for r in rows], index=frame.index, dtype=object)
    frame.attrs.update(residual_sd=math.sqrt(fit.scale) if measured else NAN, residual_df=residual_df, n=len(data))
    return frame


def _categorical(p: str, values: list, design: pd.DataFrame, fit, measured: bool, problem: str, alpha: float,
                 metric: str) -> dict:
    """Best-minus-worst level of a factor, with a Tukey-Kramer simultaneous CI."""
    k = len(values)
    counts = np.bincount(design[p].cat.codes, minlength=k)
    # Levels with a single run say nothing about their own noise and make the contrast fragile.
    thin = [(v, 2 - int(c)) for v, c in zip(values, counts) if c < 2]
    if thin:
        runs = sum(m for _, m in thin)
        each = " (one each)" if all(m == 1 for _, m in thin) and len(thin) > 1 else ""
        at = ", ".join(f"{p}={v}" for v, _ in thin)
        problem = "; ".join(filter(None, [f"{runs} more run{'s' * (runs > 1)} at {at}{each}", problem]))
    if fit is None:
        raw = design.groupby(p, observed=False)[metric].mean().to_numpy()
        text = ", ".join(f"{v}: {m:.3f} (n={int(c)})" for v, m, c in zip(values, raw, counts))
        return _row(p, "insufficient_data", problem, n_min=int(counts.min()), levels=text)

    # Adjusted mean of level L = the average prediction over the data with every row set to L:
    # mean(fitted) + beta_L - (observed mix of beta). Its differences are plain coefficient contrasts.
    names = [f'C(Q("{p}"))[T.L{i}]' for i in range(k)]
    beta = np.array([0.0] + [fit.params[n] for n in names[1:]])
    adjusted = fit.fittedvalues.mean() + beta - np.dot(counts / counts.sum(), beta)
    best, worst = int(np.argmax(adjusted)), int(np.argmin(adjusted))
    text = ", ".join(f"{v}: {m:.3f} (n={int(c)})" for v, m, c in zip(values, adjusted, counts))
    row = _row(p, "insufficient_data", problem, estimate=float(adjusted[best] - adjusted[worst]),
               n_min=int(counts.min()), best_value=values[best], levels=text)
    if thin or not measured:
        return row

    contrast = pd.Series(0.0, index=fit.params.index)
    for level, sign in ((best, 1.0), (worst, -1.0)):
        if level:  # the reference level L0 has no coefficient (it is 0): it drops out
            contrast[names[level]] = sign
    test = fit.t_test(contrast.to_numpy())
    se, df = float(np.squeeze(test.sd)), fit.df_resid
    # best and worst were picked after seeing the data: only a CI valid for all k(k-1)/2 pairs at once holds
    critical = _tukey_critical(alpha, k, df)
    p_value = _tukey_p(row["estimate"] / se, k, df) if se > 0 else float(row["estimate"] <= 0)
    low, high = row["estimate"] - critical * se, row["estimate"] + critical * se
    verdict = "effect" if low > 0 else "not_detected"
    needed = "" if verdict == "effect" else (
        f"detectable at {POWER:.0%} power: {_mde(critical, df, se):.3g}; a smaller effect needs more repeats")
    return row | {"verdict": verdict, "ci_low": low, "ci_high": high, "p_value": p_value, "needed": needed}


@functools.lru_cache(maxsize=256)
def _tukey_critical(alpha: float, k: int, df: float) -> float:
    """Tukey-Kramer critical value in SEs of a difference (the studentized range / sqrt(2)).

    Cached: the ppf integrates numerically (~0.1 s a call) and df repeats across calls.
    """
    if k == 2:  # the range of 2 means is sqrt(2)|t|: the two-sided t, exact and much faster
        return float(stats.t.ppf(1 - alpha / 2, df))
    return float(stats.studentized_range.ppf(1 - alpha, k, df)) / math.sqrt(2)


def _tukey_p(t: float, k: int, df: float) -> float:
    """Tukey-adjusted p-value of a difference whose t statistic is `t`."""
    if k == 2:
        return float(2 * stats.t.sf(t, df))
    return float(stats.studentized_range.sf(t * math.sqrt(2), k, df))


def _slope(p: str, kind: str, values: pd.Series, fit, measured: bool, problem: str, alpha: float) -> dict:
    """Linear effect of a continuous parameter: per unit, or per decade on a log scale."""
    unit = "per decade" if kind == "log" else "per unit"
    text = f"slope {unit}; n={len(values)} over {values.min():g}..{values.max():g}"
    row = _row(p, "insufficient_data", problem, n_min=len(values), levels=text)
    if fit is None:
        return row
    name = f'Q("{p}")'
    slope = float(fit.params[name])
    # Predictions are monotone in a linear term: the best observed value is an end of the range.
    row |= {"estimate": slope, "best_value": _plain(values.max() if slope >= 0 else values.min())}
    if not measured:
        return row
    low, high = (float(x) for x in fit.conf_int(alpha).loc[name])
    verdict = "effect" if low > 0 or high < 0 else "not_detected"
    critical = stats.t.ppf(1 - alpha / 2, fit.df_resid)
    needed = "" if verdict == "effect" else (
        f"detectable at {POWER:.0%} power: {_mde(critical, fit.df_resid, fit.bse[name]):.3g} {unit}; "
        "a smaller effect needs more repeats")
    return row | {"verdict": verdict, "ci_low": low, "ci_high": high, "p_value": float(fit.pvalues[name]),
                  "needed": needed}


def replicate_noise(table: pd.DataFrame, params: list[str], metric: str = "objective",
                    seed_column: str = "seed") -> tuple[float | None, int, int]:
    """Pooled within-configuration standard deviation of `metric` across different seeds.

    Rows with the same configuration and the same seed are identical reruns (zero or fake noise):
    only the first counts. Without a seed column reruns can't be told apart, so nothing is pooled.

    Returns:
        (sigma, or None when no configuration has two different seeds; number of such
        configurations; pooled degrees of freedom).
    """
    if seed_column not in table.columns or metric not in table.columns:
        return None, 0, 0
    keys = [p for p in params if p in table.columns]
    rows = table[table[metric].notna()].drop_duplicates(subset=[*keys, seed_column], keep="first")
    groups = rows.groupby(keys, dropna=False)[metric] if keys else [(None, rows[metric])]
    squares, df, configs = 0.0, 0, 0
    for _, values in groups:
        if len(values) > 1:
            squares += float(values.var(ddof=1)) * (len(values) - 1)  # pooled: weight by each group's df
            df, configs = df + len(values) - 1, configs + 1
    return (math.sqrt(squares / df) if df else None), configs, df


def _paired(gain: np.ndarray, alpha: float) -> tuple[float, float, float, float, float]:
    """Mean of paired differences: (mean, ci_low, ci_high, p_value, SE)."""
    with np.errstate(all="ignore"):
        result = stats.ttest_1samp(gain, 0.0)
    ci = result.confidence_interval(1 - alpha)
    return float(gain.mean()), float(ci.low), float(ci.high), float(result.pvalue), float(stats.sem(gain))


def epoch_curve(curves: pd.DataFrame, alpha: float = 0.05) -> tuple[pd.DataFrame, dict]:
    """Per-epoch mean with a t band across trials, and whether training longer changed the score.

    Args:
        curves: One row per trial, one column per epoch (1..E), NaN after a trial stopped.
        alpha: 1 - confidence level.

    Returns:
        (frame with `epoch, mean, ci_low, ci_high, n`; an effects-style row for `train.epochs`).
        The row compares the last epoch that every trial reached with epoch 1, paired by trial;
        `gain_last_epoch`/`gain_last_ci` do the same for that epoch versus the one before it, i.e.
        whether more epochs still help. `best_value` is the best of those common epochs: later ones
        hold only the trials that ran on, so their means are not comparable.
    """
    curves = curves[sorted(curves.columns, key=int)].rename(columns=int).astype(float)
    curves = curves[curves.notna().any(axis=1)]
    band = []
    for epoch in curves.columns:
        values = curves[epoch].dropna().to_numpy()
        low = high = NAN
        if len(values) > 1:
            low, high = stats.t.interval(1 - alpha, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
        band.append({"epoch": epoch, "mean": values.mean() if len(values) else NAN, "ci_low": low,
                     "ci_high": high, "n": len(values)})
    frame = pd.DataFrame(band, columns=["epoch", "mean", "ci_low", "ci_high", "n"])
    common = [e for e in curves.columns if curves[e].notna().all()]
    row = _row("train.epochs", "insufficient_data", "", n_min=len(curves),
               gain_last_epoch=NAN, gain_last_ci=(NAN, NAN))
    if len(curves) < 2 or len(common) < 2 or common[0] != curves.columns[0]:
        row["needed"] = ("train at least 2 trials with learning curves" if len(curves) < 2
                         else "every trial needs at least 2 epochs: train for at least 2 epochs")
        return frame, row
    first, last = common[0], common[-1]
    estimate, low, high, p_value, se = _paired((curves[last] - curves[first]).to_numpy(), alpha)
    gain = _paired((curves[last] - curves[common[-2]]).to_numpy(), alpha)
    means = frame.set_index("epoch")["mean"]
    verdict = "effect" if low > 0 or high < 0 else "not_detected"
    df = len(curves) - 1
    needed = "" if verdict == "effect" else (
        f"detectable at {POWER:.0%} power: {_mde(stats.t.ppf(1 - alpha / 2, df), df, se):.3g}; "
        "a smaller effect needs more trials")
    return frame, row | {
        "verdict": verdict, "estimate": estimate, "ci_low": low, "ci_high": high, "p_value": p_value,
        "best_value": int(means.loc[common].idxmax()), "needed": needed,
        "levels": f"epoch {first}: {means[first]:.3f}, epoch {last}: {means[last]:.3f} (n={len(curves)})",
        "gain_last_epoch": gain[0], "gain_last_ci": (gain[1], gain[2]),
    }


def compare_two(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict:
    """Welch t comparison of mean(a) - mean(b), e.g. the MNIST CNN's scores against CIFAR-10's.

    Returns:
        A dict with verdict, estimate, ci_low, ci_high, n_min, p_value and needed.
    """
    a, b = (np.asarray(x, dtype=float) for x in (a, b))
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    out = {"verdict": "insufficient_data", "estimate": NAN, "ci_low": NAN, "ci_high": NAN,
           "n_min": int(min(len(a), len(b))), "p_value": NAN, "needed": ""}
    if len(a) and len(b):
        out["estimate"] = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        short = [f"{2 - len(x)} more run{'s' * (len(x) == 0)} of {name}" for name, x in (("a", a), ("b", b))
                 if len(x) < 2]
        return out | {"needed": ", ".join(short) + " (Welch's t needs 2 per side)"}
    with np.errstate(all="ignore"):
        result = stats.ttest_ind(a, b, equal_var=False)
    if np.isnan(result.pvalue):  # no variation on either side: no noise estimate
        return out | {"needed": "runs with different seeds: neither side varies"}
    ci = result.confidence_interval(1 - alpha)
    verdict = "effect" if ci.low > 0 or ci.high < 0 else "not_detected"
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    needed = "" if verdict == "effect" else (
        f"detectable at {POWER:.0%} power: {_mde(stats.t.ppf(1 - alpha / 2, result.df), result.df, se):.3g}; "
        "a smaller difference needs more runs")
    return out | {"verdict": verdict, "ci_low": float(ci.low), "ci_high": float(ci.high),
                  "p_value": float(result.pvalue), "needed": needed}


def simulate_study(rng: np.random.Generator, design: dict[str, list], effects: dict[str, dict], sigma: float,
                   replicates: int) -> pd.DataFrame:
    """A full-factorial study with known truth: objective = 0.5 + sum of level effects + N(0, sigma).

    Args:
        rng: The random generator (seed it for reproducible studies).
        design: Parameter name -> the values tried; every combination is run `replicates` times.
        effects: Parameter name -> {value: shift of the objective}; values not named shift by 0.
        sigma: Standard deviation of the seed noise.
        replicates: Runs per combination, each with a distinct `seed`.
    """
    rows = [dict(zip(design, combo)) for combo in itertools.product(*design.values()) for _ in range(replicates)]
    table = pd.DataFrame(rows, columns=list(design))
    table["seed"] = np.arange(len(table))
    shift = sum((table[p].map(lambda v, e=e: e.get(v, 0.0)).astype(float) for p, e in effects.items()),
                start=pd.Series(0.0, index=table.index))
    table["objective"] = 0.5 + shift + rng.normal(0.0, sigma, len(table))
    return table

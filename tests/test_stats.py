"""cnnexp.stats: calibration on simulated studies with known truth, and the edge cases of each verdict.

Pure numpy/pandas/statsmodels: no training, no network; the whole file runs in well under a minute.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
from cnnexp.report.stats import COLUMNS, VERDICTS, compare_two, effects, epoch_curve, replicate_noise, simulate_study
from scipy import stats as sps
from statsmodels.stats.multicomp import pairwise_tukeyhsd

SIGMA = 0.02
STUDIES = 300  # per calibration case: the SE of a 5% rate is then 1.3 points
LRS = [float(x) for x in 10 ** np.arange(-4, -0.9, 0.5)]  # 7 values, 1e-4 .. 1e-1, half a decade apart


def _unbalanced(table: pd.DataFrame) -> pd.DataFrame:
    """Drop 3 of the 4 runs of cells (a=0, b=1) and (a=1, b=0): `a` becomes confounded with `b`.

    A marginal comparison of `a` would then pick up most of `b`'s effect; the additive model must not.
    """
    cell = (table["a"] != table["b"]) & (table.groupby(["a", "b"]).cumcount() > 0)
    return table[~cell]


def _rate(verdicts: list[str], wanted: str = "effect") -> float:
    return sum(v == wanted for v in verdicts) / len(verdicts)


@functools.cache
def _confounded_studies() -> tuple[pd.DataFrame, ...]:
    """STUDIES results of: `a` (2 levels) with no effect, `b` (2 levels) 3 sigma better at b=1; 4 runs per cell,
    then unbalanced so that a=1 mostly comes with b=1. Shared by the false-positive and the coverage test."""
    rng = np.random.default_rng(11)
    return tuple(effects(_unbalanced(simulate_study(rng, {"a": [0, 1], "b": [0, 1]}, {"b": {1: 3 * SIGMA}}, SIGMA, 4)),
                         ["a", "b"]).set_index("parameter") for _ in range(STUDIES))


def test_false_positive_rate_of_a_two_level_factor_with_a_confounded_real_effect():
    """`a` has no effect (see `_confounded_studies`): at most 7% of the studies may call it an effect
    (nominal 5%). A model of `a` alone (marginal means) calls it an effect in ~22% of them."""
    rate = _rate([result.loc["a", "verdict"] for result in _confounded_studies()])
    print(f"false-positive rate, 2 levels, confounded: {rate:.3f}")
    assert 0.02 <= rate <= 0.07  # the lower bound catches a test so conservative it never fires


def test_coverage_of_the_two_level_difference():
    """The 95% CI of `b`'s best-minus-worst (true value +3 sigma, or -3 sigma should the data point the
    wrong way) in the unbalanced studies covers the truth at about the nominal rate."""
    covered = []
    for result in _confounded_studies():
        row = result.loc["b"]
        truth = 3 * SIGMA if row["best_value"] == 1 else -3 * SIGMA
        covered.append(row["ci_low"] <= truth <= row["ci_high"])
    coverage = float(np.mean(covered))
    print(f"coverage, 2 levels: {coverage:.3f}")
    assert 0.92 <= coverage <= 0.98


def test_false_positive_rate_of_a_six_level_factor_is_tukey_controlled():
    """`k` (6 levels) has no effect, `b` (2 levels) shifts by 3 sigma; 2 runs per cell (24 runs).

    Best-minus-worst of 6 levels is the largest of 15 pairwise differences: with an unadjusted t CI it
    would be called an effect in ~33% of studies (Monte Carlo); Tukey-Kramer keeps it at 5%."""
    rng = np.random.default_rng(12)
    verdicts = []
    for _ in range(STUDIES):
        table = simulate_study(rng, {"k": [2, 3, 4, 5, 6, 7], "b": [0, 1]}, {"b": {1: 3 * SIGMA}}, SIGMA, 2)
        verdicts.append(effects(table, ["k", "b"]).loc[0, "verdict"])
    rate = _rate(verdicts)
    print(f"false-positive rate, 6 levels: {rate:.3f}")
    assert 0.02 <= rate <= 0.07


def test_power_for_a_three_sigma_effect_of_a_two_level_factor():
    """Design: a (2 levels, a=1 is 3 sigma better) x b (2 levels, no effect), 2 runs per cell: 8 runs.

    SE of the difference = sigma / sqrt(2), residual df = 8 - 3 = 5, so t is noncentral with
    nc = 3 sqrt(2) = 4.24: expected power = P(|t'(5, 4.24)| > t_.975(5) = 2.571) = 0.919."""
    expected = sps.nct.sf(sps.t.ppf(0.975, 5), 5, 3 * math.sqrt(2)) + sps.nct.cdf(-sps.t.ppf(0.975, 5), 5,
                                                                                  3 * math.sqrt(2))
    rng = np.random.default_rng(13)
    rows = [effects(simulate_study(rng, {"a": [0, 1], "b": [0, 1]}, {"a": {1: 3 * SIGMA}}, SIGMA, 2),
                    ["a", "b"]).iloc[0] for _ in range(STUDIES)]
    power = _rate([r["verdict"] for r in rows])
    print(f"power, 2 levels: {power:.3f} (expected {expected:.3f})")
    assert power >= 0.80 and abs(power - expected) < 0.05
    assert all(r["best_value"] == 1 for r in rows if r["verdict"] == "effect")


def test_power_for_a_three_sigma_effect_of_a_six_level_factor():
    """Design: k (6 levels, k=5 is 3 sigma better than the rest) x b (2 levels), 2 runs per cell: 24 runs.

    4 runs per level: a pairwise SE is sigma / sqrt(2), df = 24 - 7 = 17, Tukey critical value 3.20 SEs.
    k=5 against one given level alone clears it with P(t'(17, nc=4.24) > 3.20) = 0.83; the range over
    the 6 means clears it in 0.97 of studies (expected power; Monte Carlo, 200k draws)."""
    rng = np.random.default_rng(14)
    rows = [effects(simulate_study(rng, {"k": [2, 3, 4, 5, 6, 7], "b": [0, 1]}, {"k": {5: 3 * SIGMA}}, SIGMA, 2),
                    ["k", "b"]).iloc[0] for _ in range(STUDIES)]
    power = _rate([r["verdict"] for r in rows])
    print(f"power, 6 levels: {power:.3f} (expected 0.97)")
    assert power >= 0.80
    assert _rate([r["best_value"] == 5 for r in rows], True) >= 0.95


def test_one_way_tukey_interval_matches_statsmodels_tukeyhsd():
    rng = np.random.default_rng(16)
    table = simulate_study(rng, {"k": [3, 5, 7, 9]}, {"k": {7: 2 * SIGMA}}, SIGMA, 3)
    row = effects(table, ["k"]).iloc[0]
    means = table.groupby("k")["objective"].mean()
    assert row["estimate"] == pytest.approx(means.max() - means.min())
    hsd = pairwise_tukeyhsd(table["objective"], table["k"])
    pair = [i for i, (g1, g2) in enumerate(zip(hsd.groupsunique[hsd._multicomp.pairindices[0]],
                                                hsd.groupsunique[hsd._multicomp.pairindices[1]]))
            if {g1, g2} == {means.idxmax(), means.idxmin()}][0]
    half = (hsd.confint[pair][1] - hsd.confint[pair][0]) / 2
    assert row["ci_high"] - row["estimate"] == pytest.approx(half, rel=1e-3)
    assert row["p_value"] == pytest.approx(hsd.pvalues[pair], abs=2e-3)


def test_adjusted_means_remove_the_confounded_factor():
    """One unbalanced study, no noise in `a`: the marginal difference of `a` is large, the adjusted one ~0."""
    rng = np.random.default_rng(17)
    table = _unbalanced(simulate_study(rng, {"a": [0, 1], "b": [0, 1]}, {"b": {1: 0.2}}, 0.001, 4))
    marginal = table.groupby("a")["objective"].mean()
    assert marginal[1] - marginal[0] > 0.1
    row = effects(table, ["a", "b"]).iloc[0]
    assert abs(row["estimate"]) < 0.005 and row["verdict"] == "not_detected"
    assert row["needed"].startswith("detectable at 80% power:")


def _lr_study(rng: np.random.Generator, slope: float) -> pd.DataFrame:
    return simulate_study(rng, {"train.lr": LRS, "b": [0, 1]},
                          {"train.lr": {lr: slope * math.log10(lr) for lr in LRS}}, SIGMA, 1)


def test_log_scale_slope_is_detected_with_its_sign_and_no_slope_is_not():
    """lr at 7 values (half a decade apart) x b (2 levels), one run each: Sxx = 14 decades^2, so the SE of
    the slope is sigma / sqrt(14) and a slope of -1 sigma per decade has nc = 3.74, df = 11: power 0.93."""
    rng = np.random.default_rng(18)
    found = [effects(_lr_study(rng, -SIGMA), ["train.lr", "b"], log_scale={"train.lr"}).iloc[0] for _ in range(200)]
    power = _rate([r["verdict"] for r in found])
    print(f"power, slope per decade: {power:.3f}")
    assert power >= 0.85
    assert all(r["estimate"] < 0 and r["best_value"] == LRS[0] for r in found if r["verdict"] == "effect")
    assert found[0]["n_min"] == 14 and "per decade" in found[0]["levels"]
    null = [effects(_lr_study(rng, 0.0), ["train.lr", "b"], log_scale={"train.lr"}).loc[0, "verdict"]
            for _ in range(200)]
    print(f"false-positive rate, slope: {_rate(null):.3f}")
    assert _rate(null) <= 0.07


def test_continuous_can_be_forced_for_few_values_and_is_linear_per_unit():
    rng = np.random.default_rng(19)
    table = simulate_study(rng, {"width": [0.25, 0.5, 1.0]}, {"width": {0.25: 0.0, 0.5: 0.025, 1.0: 0.075}}, 0.002, 3)
    row = effects(table, ["width"], continuous={"width"}).iloc[0]
    assert row["verdict"] == "effect" and row["estimate"] == pytest.approx(0.1, abs=0.01)
    assert row["best_value"] == 1.0 and "per unit" in row["levels"]
    assert effects(table, ["width"]).loc[0, "levels"].startswith("0.25: ")  # categorical by default


def test_insufficient_data_names_the_thin_levels():
    rng = np.random.default_rng(20)
    full = simulate_study(rng, {"kernel": [3, 5, 6, 7]}, {}, SIGMA, 3)
    two_thin = full[full["kernel"].isin([3, 5]) | (full.groupby("kernel").cumcount() == 0)]
    row = effects(two_thin, ["kernel"]).iloc[0]
    assert row["verdict"] == "insufficient_data" and row["n_min"] == 1
    assert row["needed"] == "2 more runs at kernel=6, kernel=7 (one each)"
    assert math.isnan(row["ci_low"]) and not math.isnan(row["estimate"])
    one_thin = full[(full["kernel"] != 7) | (full.groupby("kernel").cumcount() == 0)]
    assert effects(one_thin, ["kernel"]).loc[0, "needed"] == "1 more run at kernel=7"


def test_insufficient_data_for_one_value_no_rows_and_no_residual_df():
    rng = np.random.default_rng(21)
    table = simulate_study(rng, {"kernel": [3], "b": [0, 1]}, {}, SIGMA, 3)
    row = effects(table, ["kernel", "b"]).iloc[0]
    assert row["verdict"] == "insufficient_data" and "try at least 2 values" in row["needed"]
    assert row["best_value"] == 3

    empty = effects(table.iloc[:0], ["kernel", "b", "train.lr"])
    assert list(empty["parameter"]) == ["kernel", "b", "train.lr"] and empty.attrs["n"] == 0
    assert (empty["verdict"] == "insufficient_data").all() and (empty["needed"].str.len() > 0).all()

    tiny = simulate_study(rng, {"a": [0, 1], "b": [0, 1]}, {"a": {1: 0.1}}, SIGMA, 1)  # 4 runs, 3 coefficients
    result = effects(tiny, ["a", "b"])
    assert (result["verdict"] == "insufficient_data").all() and result.attrs["residual_df"] == 1
    assert result.loc[0, "needed"] == "1 more run (any configuration) for residual degrees of freedom"
    assert result.loc[0, "estimate"] > 0 and math.isnan(result.loc[0, "ci_low"])


def test_one_row_per_searched_parameter_with_one_verdict_each():
    rng = np.random.default_rng(22)
    table = simulate_study(rng, {"model.kernel": [3, 5], "train.seed": [0, 1, 2], "train.lr": LRS,
                                 "train.flag": [True, False], "unused": ["x"]}, {"model.kernel": {5: 0.1}}, SIGMA, 1)
    params = ["train.seed", "model.kernel", "unused", "train.lr", "train.flag", "not.in.table"]
    result = effects(table, params, log_scale={"train.lr"})
    assert list(result.columns) == COLUMNS and list(result["parameter"]) == params
    assert result["verdict"].isin(VERDICTS).all()
    assert result.set_index("parameter").loc["model.kernel", "verdict"] == "effect"
    assert result.set_index("parameter").loc["unused", "verdict"] == "insufficient_data"
    assert (result["needed"].eq("") == result["verdict"].eq("effect")).all()
    assert result.attrs["n"] == len(table) and result.attrs["residual_sd"] == pytest.approx(SIGMA, rel=0.3)


def test_replicate_noise_ignores_identical_reruns_and_recovers_sigma():
    rng = np.random.default_rng(23)
    table = simulate_study(rng, {"k": [3, 5, 7], "b": [0, 1]}, {"k": {7: 0.1}}, SIGMA, 1)
    reruns = pd.concat([table, table.assign(objective=table["objective"] + 0.05)])  # same seed, other value
    assert replicate_noise(reruns, ["k", "b"]) == (None, 0, 0)

    large = simulate_study(rng, {"k": [3, 5, 7], "b": [0, 1]}, {"k": {7: 0.1}}, SIGMA, 10)
    sigma, configs, df = replicate_noise(pd.concat([large, large.iloc[:6].assign(objective=9.0)]), ["k", "b"])
    assert configs == 6 and df == 6 * 9
    assert sigma == pytest.approx(SIGMA, rel=0.2)


def _curves(rng: np.random.Generator, trials: int, rise: float, epochs: int = 5) -> pd.DataFrame:
    e = np.arange(1, epochs + 1)
    rows = [0.3 + rise * (1 - np.exp(-e / 2)) + rng.normal(0, 0.03) + rng.normal(0, 0.01, epochs)
            for _ in range(trials)]
    return pd.DataFrame(rows, columns=e)


def test_epoch_curve_rising_flat_and_early_stopped():
    rng = np.random.default_rng(24)
    band, row = epoch_curve(_curves(rng, 5, 0.4))
    assert row["verdict"] == "effect" and row["estimate"] > 0 and row["gain_last_epoch"] > 0
    assert row["best_value"] == 5 and row["gain_last_ci"][0] <= row["gain_last_epoch"] <= row["gain_last_ci"][1]
    assert list(band.columns) == ["epoch", "mean", "ci_low", "ci_high", "n"] and (band["n"] == 5).all()
    wide = (band["ci_high"] - band["ci_low"]).mean()
    band40, _ = epoch_curve(_curves(rng, 40, 0.4))
    assert (band40["ci_high"] - band40["ci_low"]).mean() < wide / 2

    flat = [epoch_curve(_curves(rng, 5, 0.0))[1]["verdict"] for _ in range(STUDIES)]
    print(f"false-positive rate, flat curves: {_rate(flat):.3f}")
    assert _rate(flat) <= 0.07 and _rate(flat, "not_detected") >= 0.93

    stopped = _curves(rng, 6, 0.4)
    stopped.iloc[0, 3:] = np.nan  # trial 0 stopped after epoch 3: the paired comparison ends there
    _, row = epoch_curve(stopped)
    assert row["estimate"] == pytest.approx((stopped[3] - stopped[1]).mean())
    assert row["gain_last_epoch"] == pytest.approx((stopped[3] - stopped[2]).mean())

    for curves in (_curves(rng, 1, 0.4), _curves(rng, 5, 0.4, epochs=1)):
        row = epoch_curve(curves)[1]
        assert row["verdict"] == "insufficient_data" and row["needed"]


def test_compare_two_welch():
    mnist, cifar = [0.991, 0.989, 0.990], [0.71, 0.69, 0.73, 0.70]
    out = compare_two(mnist, cifar)
    expected = sps.ttest_ind(mnist, cifar, equal_var=False).confidence_interval(0.95)
    assert out["verdict"] == "effect" and out["estimate"] > 0.25 and out["ci_low"] == pytest.approx(expected.low)
    assert compare_two(cifar, mnist)["estimate"] < 0 and compare_two(cifar, mnist)["ci_high"] < 0
    assert compare_two([0.5, 0.52, 0.51], [0.51, 0.5, 0.52])["verdict"] == "not_detected"
    short = compare_two([0.99], cifar)
    assert short["verdict"] == "insufficient_data" and "1 more run of a" in short["needed"]

"""cnnexp.stats: calibration on simulated studies with known truth, shaped like the study `make sweep` runs.

Pure numpy/pandas/scipy: no training, no network. Each case simulates hundreds of studies; the
rates printed in the closing note come from these same tests (`pytest -s tests/test_stats.py`).
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multicomp import pairwise_tukeyhsd

from cnnexp.stats.curves import at_equal, epochs_answer, value_at
from cnnexp.stats.effects import critical, failures
from cnnexp.stats.effects import factor_answers as answers
from cnnexp.stats.sequential import Cell, Need, allocate, spend
from cnnexp.stats.simulate import Simulator, curves, design_study, factorial_study, sequential_study, simulated_design

STUDIES = 300  # per case: the SE of a 5% rate is then 1.3 points
LEVELS = {"kernel": [2, 3, 4, 5, 6, 7], "width": [0.25, 0.5, 1.0], "train.batch_size": [32, 100, 256]}
BASELINE = {"kernel": 3, "width": 0.5, "train.batch_size": 100}
KINDS = {k: "categorical" for k in LEVELS}
SEEDS, BASELINE_SEEDS = 4, 12  # the default study's first round


POWER = {"kernel": {5: 3.0}, "width": {1.0: -3.0}, "train.batch_size": {32: 3.0}}  # 3 sigma, one value each
CASES = {
    "null": {}, "power": {"effects": POWER},
    "unequal": {"cell_sigma": {("kernel", 7): 3.0, ("width", 1.0): 3.0, ("train.batch_size", 256): 3.0}},
    "outlier": {"outlier": ("kernel", 7)},
}


@functools.cache
def _verdicts(case: str) -> dict[str, list[str]]:
    """Verdicts per question over STUDIES simulated default studies of one case (sigma = 1)."""
    options = dict(CASES[case])
    effects = options.pop("effects", {})
    rng = np.random.default_rng(sorted(CASES).index(case))
    out: dict[str, list[str]] = {k: [] for k in LEVELS}
    for _ in range(STUDIES):
        table = design_study(rng, LEVELS, BASELINE, effects, 1.0, SEEDS, BASELINE_SEEDS, **options)
        for answer in answers(table, list(LEVELS), KINDS):
            out[answer.parameter].append(answer.verdict)
    return out


def _rate(verdicts: list[str], wanted: str = "effect") -> float:
    return sum(v == wanted for v in verdicts) / len(verdicts)


@pytest.mark.parametrize("case", ["null", "unequal", "outlier"])
def test_no_factor_is_called_an_effect_in_more_than_7_percent_of_studies_without_one(case):
    rates = {q: _rate(v) for q, v in _verdicts(case).items()}
    print(f"false effect, {case}: {rates}")
    assert all(rate <= 0.07 for rate in rates.values()), rates


@pytest.mark.parametrize("case", ["power"])
def test_a_three_sigma_effect_is_found_in_at_least_80_percent_of_studies(case):
    rates = {q: _rate(v) for q, v in _verdicts(case).items()}
    print(f"power at 3 sigma, {case}: {rates}")
    assert all(rate >= 0.80 for rate in rates.values()), rates


def test_a_failed_run_is_counted_apart_and_does_not_widen_the_other_questions():
    rng = np.random.default_rng(5)
    table = design_study(rng, LEVELS, BASELINE, {}, 0.01, SEEDS, BASELINE_SEEDS, outlier=("kernel", 7))
    by = {a.parameter: a for a in answers(table, list(LEVELS), KINDS)}
    seven = next(lv for lv in by["kernel"].levels if lv.value == 7)
    assert (seven.n, seven.failed) == (SEEDS - 1, 1)
    # Without the failure filter the 0.10 run would put the kernel CI (and the pooled SD) far apart.
    assert by["kernel"].ci_high - by["kernel"].ci_low < 0.1
    assert by["width"].ci_high - by["width"].ci_low < 0.1
    assert failures(by["kernel"].levels) > 0.05  # one failure in 36 runs: no evidence of a different rate


def test_failure_rates_that_differ_are_found():
    from cnnexp.stats.effects import Level

    assert failures([Level(0.03, n=10, failed=0), Level(0.3, n=2, failed=8)]) < 0.01


def test_equivalence_is_declared_when_the_values_truly_agree_and_not_when_they_differ_by_twice_the_precision():
    rng = np.random.default_rng(9)
    agree = [answers(design_study(rng, {"width": [0.25, 0.5, 1.0]}, {"width": 0.5}, {}, 0.005, 8, 24),
                     ["width"], {"width": "categorical"}, margin=0.015)[0].verdict for _ in range(100)]
    assert _rate(agree, "equivalent") >= 0.9
    apart = [answers(design_study(rng, {"width": [0.25, 0.5, 1.0]}, {"width": 0.5}, {"width": {1.0: 0.03}},
                                  0.01, 4, 12),
                     ["width"], {"width": "categorical"}, margin=0.015)[0].verdict for _ in range(STUDIES)]
    assert _rate(apart, "equivalent") <= 0.07


# The default study's shape: its factors and values, 4 seeds a cell, the baseline about sqrt(k) times as many, the long
# arm's 4 runs as baseline replicates, 4 looks, later rounds where allocate says; sigma 1.6 points between runs, 3,000
# evaluation images shared by every run.
DEFAULT_LEVELS = {"kernel": [2, 3, 4, 5], "width": [0.125, 0.25, 0.5], "train.batch_size": [32, 100, 256]}
DEFAULT_BASELINE = {"kernel": 3, "width": 0.25, "train.batch_size": 100}
SIGMA, MARGIN, SIMULATED = 0.016, 0.015, 200
THREE_SIGMA = {"kernel": {5: 3 * SIGMA}, "width": {0.5: 3 * SIGMA}, "train.batch_size": {32: -3 * SIGMA}}


@functools.cache
def _sequential(offset: float, effects: str = "") -> dict[str, float]:
    """Per question, the share of simulated default studies (image by image, the real rules) called `effect`."""
    rng = np.random.default_rng(int(offset * 1e4) + len(effects))
    design = simulated_design(DEFAULT_LEVELS, DEFAULT_BASELINE)
    truth = THREE_SIGMA if effects else {}
    verdicts = [sequential_study(Simulator(rng, design, truth, SIGMA, offset), MARGIN) for _ in range(SIMULATED)]
    return {q: _rate([v[q] for v in verdicts]) for q in DEFAULT_LEVELS}


def test_a_fixed_offset_of_each_configuration_on_the_evaluation_images_stays_inside_every_ci():
    """Every run is scored on the same images, so each configuration's luck on them is shared by all its runs: a
    fixed offset of 0.4 points per configuration. With the per-image term in every contrast the study keeps each
    question's false `effect` at 5% (+2 simulation SEs), over 4 looks and its real allocation."""
    rates = _sequential(0.004)
    print(f"false effect, offset 0.4 points, {SIMULATED} sequential default studies: {rates}")
    limit = 0.05 + 2 * np.sqrt(0.05 * 0.95 / SIMULATED)
    assert all(rate <= limit for rate in rates.values()), rates


def test_the_same_studies_find_a_three_sigma_difference_in_at_least_80_percent():
    rates = _sequential(0.004, "3 sigma")
    print(f"power at 3 sigma, offset 0.4 points, {SIMULATED} sequential default studies: {rates}")
    assert all(rate >= 0.80 for rate in rates.values()), rates


def test_the_per_image_term_is_what_covers_the_offset():
    """Without the evaluation images' term (the same runs, their right/wrong dropped) the offset leaks into verdicts."""
    rng = np.random.default_rng(33)
    design = simulated_design(DEFAULT_LEVELS, DEFAULT_BASELINE)
    with_term, without = [], []
    for _ in range(150):
        table = Simulator(rng, design, {}, SIGMA, 0.008).first_round(arm_runs=4)
        for rows, out in ((table, with_term), (table.drop(columns="correct"), without)):
            out.append(any(a.verdict == "effect" for a in answers(rows, list(DEFAULT_LEVELS), KINDS, margin=MARGIN)))
    print(f"some question called an effect, offset 0.8 points: with the term {np.mean(with_term):.3f}, "
          f"without {np.mean(without):.3f}")
    assert np.mean(with_term) < np.mean(without)


def test_spending_adds_up_to_alpha_and_spends_little_early():
    looks = [spend(j, 4, 0.05) for j in range(1, 5)]
    assert sum(looks) == pytest.approx(0.05) and looks[0] < looks[-1]
    assert spend(2, 4, 0.05, final=True) == pytest.approx(0.05 - spend(1, 4, 0.05))


def test_allocation_favours_the_shared_baseline_and_the_cheap_cells():
    cells = {"base": Cell(4, 1.0, 1.0), "a": Cell(4, 1.0, 1.0), "b": Cell(4, 1.0, 1.0), "slow": Cell(4, 1.0, 10.0)}
    needs = [Need("x", [("base", "a")]), Need("y", [("base", "b")]), Need("z", [("base", "slow")])]
    add = allocate(needs, cells, 12.0)
    assert add["base"] > add.get("a", 0) and add.get("slow", 0) == 0
    assert allocate([], cells, 12.0) == {} and allocate(needs, cells, 0.5) == {}


def test_one_way_intervals_match_statsmodels_tukey_when_variances_are_equal():
    rng = np.random.default_rng(3)
    table = factorial_study(rng, {"kernel": [3, 5, 7]}, {"kernel": {7: 0.03}}, 0.01, 8)
    ours = answers(table, ["kernel"], {"kernel": "categorical"}, seed_column=None)[0]
    theirs = pairwise_tukeyhsd(table["objective"], table["kernel"])
    low, high = theirs.confint[-1]  # 5 vs 7: the last pair
    pair = next(p for p in ours.pairs if {p[0], p[1]} == {5, 7})
    assert (-pair[4], -pair[3]) == pytest.approx((low, high), abs=0.004)  # ours is 5 - 7; theirs 7 - 5


def test_adjusted_means_remove_a_confounded_factor_in_an_optimisers_study():
    rng = np.random.default_rng(4)
    table = factorial_study(rng, {"a": [0, 1], "b": [0, 1]}, {"b": {1: 0.05}}, 0.01, 4)
    table = table[~((table["a"] != table["b"]) & (table.groupby(["a", "b"]).cumcount() > 0))]  # a=1 comes with b=1
    raw = table.groupby("a")["objective"].mean()
    assert raw[1] - raw[0] > 0.03  # marginally, a looks like an effect
    by = {x.parameter: x
          for x in answers(table, ["a", "b"], {"a": "categorical", "b": "categorical"}, seed_column=None)}
    assert by["a"].verdict != "effect" and abs(by["a"].estimate) < 0.02 and by["b"].verdict == "effect"


def test_a_log_slope_has_its_sign_and_a_flat_one_is_not_an_effect():
    rng = np.random.default_rng(7)
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    table = pd.DataFrame([{"lr": lr, "objective": 0.5 + 0.02 * np.log10(lr) + rng.normal(0, 0.005), "seed": i}
                          for i, lr in enumerate(lrs * 4)])
    slope = answers(table, ["lr"], {"lr": "log"})[0]
    assert slope.verdict == "effect" and slope.estimate == pytest.approx(0.02, abs=0.005) and slope.best == 0.1
    table["objective"] = 0.5 + rng.normal(0, 0.005, len(table))
    assert answers(table, ["lr"], {"lr": "log"})[0].verdict in ("not_detected", "equivalent")


def test_insufficient_data_names_the_thin_values_and_one_value_alone():
    table = pd.DataFrame({"kernel": [3, 3, 5], "objective": [0.4, 0.41, 0.45], "seed": [0, 1, 0]})
    (answer,) = answers(table, ["kernel"], {"kernel": "categorical"})
    assert answer.verdict == "insufficient_data" and answer.runs_needed == 1 and "kernel=5" in answer.why
    (alone,) = answers(table[table["kernel"] == 3], ["kernel"], {"kernel": "categorical"})
    assert alone.verdict == "insufficient_data" and "only kernel=3 was tried" in alone.why


def test_the_kind_of_a_parameter_is_what_its_expression_declared_not_a_count_of_values():
    table = pd.DataFrame([{"k": k, "objective": 0.4 + 0.01 * k, "seed": s} for k in range(1, 8) for s in range(2)])
    assert answers(table, ["k"], {"k": "categorical"})[0].kind == "categorical"  # 7 values, still a choice
    assert answers(table, ["k"], {"k": "linear"})[0].kind == "linear"


def test_epochs_best_epoch_at_or_beyond_and_overfitting():
    rng = np.random.default_rng(2)
    rising = curves(rng, 5, 8, lambda e: 0.3 + 0.02 * e, 0.003)
    answer = epochs_answer(rising, 2)
    assert answer.at_or_beyond and answer.best_epoch == 8 and answer.verdict == "effect"
    peaked = curves(rng, 5, 8, lambda e: 0.5 - 0.01 * abs(e - 4), 0.002)
    answer = epochs_answer(peaked, 2)
    assert not answer.at_or_beyond and 3 <= answer.best_epoch <= 5 and answer.overfits is not None


@pytest.mark.parametrize(("gain", "wanted", "bound"), [(0.0, "effect", 0.07), (0.03, "effect", 0.80)])
def test_the_epochs_verdict_is_calibrated_on_correlated_curves(gain, wanted, bound):
    """Flat after the base epochs (no effect: <= 7% effect) and 3 sigma higher at the end (>= 80%)."""
    rng = np.random.default_rng(8)
    verdicts = []
    for _ in range(STUDIES):
        runs = curves(rng, 4, 16, lambda e: 0.45 + (gain * (e - 4) / 12 if e > 4 else 0.0), 0.01, run_sd=0.01, rho=0.7)
        verdicts.append(epochs_answer(runs, 4).verdict)
    rate = _rate(verdicts, wanted)
    print(f"epochs, gain {gain}: effect rate {rate}")
    assert rate <= bound if gain == 0 else rate >= bound


def test_values_are_read_between_epochs_never_beyond_and_compared_at_equal_updates():
    curve = {1: 0.2, 2: 0.4, 3: 0.5}
    assert value_at(curve, 1.5) == pytest.approx(0.3) and value_at(curve, 3.5) is None and value_at(curve, 0.5) is None
    assert value_at(curve, 150, scale=[100, 200, 300]) == pytest.approx(0.3)
    reference = [{1: 0.2, 2: 0.4, 3: 0.5}, {1: 0.22, 2: 0.41, 3: 0.52}]
    scales = [[100, 200, 300]] * 2
    compared = at_equal([0.41, 0.39, 0.40], 200, reference, scales, 256, "updates")
    assert compared.difference is not None and compared.difference.low < 0 < compared.difference.high
    assert at_equal([0.4, 0.4], 900, reference, scales, 32, "updates").why.startswith("the reference runs reach")


def test_critical_values_are_interpolated_close_to_the_exact_studentized_range():
    from scipy import stats

    for k, df in ((3, 7), (6, 25), (6, 45)):
        exact = stats.studentized_range.ppf(0.95, k, df) / np.sqrt(2)
        assert critical(0.05, k, df) == pytest.approx(exact, rel=0.005)


def test_a_value_whose_runs_all_fail_is_answered_by_its_failure_rate_and_the_rest_by_accuracy():
    """seed_check's case: lr 0.3 diverges or sits at chance in every run; the seed is no effect, the lr is."""
    rng = np.random.default_rng(4)
    rows = []
    for seed in range(4):
        for lr, mean in ((0.003, 0.20), (0.03, 0.30), (0.3, None)):
            for _ in range(2):
                failed = mean is None
                rows.append({"train.seed": seed, "train.lr": lr, "failed": failed,
                             "objective": 0.1 if failed else mean + rng.normal(0, 0.01)})
    table = pd.DataFrame(rows)
    kinds = {"train.seed": "categorical", "train.lr": "categorical"}
    by = {a.parameter: a for a in answers(table, ["train.seed", "train.lr"], kinds, seed_column=None)}
    lr = by["train.lr"]
    assert lr.verdict == "effect" and [lv.value for lv in lr.failing] == [0.3] and lr.failure_p < 0.001
    assert {lv.value for lv in lr.levels} == {0.003, 0.03} and lr.ci_low > 0.05  # the values that trained differ too
    assert by["train.seed"].verdict != "effect"
    # One failed run of one value, the others clean: not enough to call its failure rate an effect.
    few = table[(table["train.lr"] != 0.3) | (table.index == table.index[table["train.lr"] == 0.3][0])]
    lr = {a.parameter: a for a in answers(few, ["train.lr"], {"train.lr": "categorical"}, seed_column=None)}["train.lr"]
    assert lr.failing and lr.failure_p > 0.05 and lr.verdict == "effect"  # only through the accuracy of 0.003 vs 0.03

"""The notebook's questions answered in plain words, from an `Analysis`: the last step turns numbers into words.

Every answer states what it compares at (equal epochs, updates or seconds) and in which regime, its
estimate with a CI that holds at the error rate it says, the n its contrast uses, its cost from
the configurations it compares (never mixing in another factor), and, unsettled, what would settle it.
"""

from __future__ import annotations

import math
import re

from cnnexp.reporting.analysis import Analysis, Cost
from cnnexp.stats.curves import Interval
from cnnexp.stats.effects import Answer, critical
from cnnexp.stats.settle import cell_key

QUESTIONS = [  # (label, how to recognise its parameter)
    ("2.i Kernel size", re.compile(r"^(kernel|model\.layers\.\d+\.kernel)$")),
    ("2.ii Filters", re.compile(r"^(width|filters|model\.layers\.\d+\.filters)$")),
    ("3.i Batch size", re.compile(r"^train\.batch_size$")),
    ("3.ii Epochs", re.compile(r"^train\.epochs$")),
]


def pts(value: float, sign: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "?"
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def label(parameter: str) -> str:
    return next((name for name, pattern in QUESTIONS if pattern.match(parameter)), parameter)


def _value(parameter: str, value) -> str:
    return f"{parameter}={value}"


def _cost_phrase(analysis: Analysis, answer: Answer) -> str:
    """Cost of the best against the worst value, from their own cells (a design) or the model's runs."""
    def cell_cost(value) -> Cost | None:
        design = analysis.design
        if not design:
            return None
        cell = {"task": design["main"], **{k: design["baseline"][k] for k in design["vary"]}, answer.parameter: value}
        return analysis.costs.get(cell_key(cell))

    best, worst = cell_cost(answer.best), cell_cost(answer.worst)
    if best is None or worst is None:
        return ""
    parts = []
    if best.flops and worst.flops and math.isfinite(best.flops):
        parts.append(f"{best.flops / worst.flops:.1f}x the FLOPs per image ({best.flops / 1e6:.0f} vs "
                     f"{worst.flops / 1e6:.0f} MFLOPs)")
    if best.params and worst.params and math.isfinite(best.params):
        parts.append(f"{best.params / worst.params:.1f}x the parameters")
    if best.seconds and worst.seconds and math.isfinite(best.seconds):
        parts.append(f"{best.seconds / worst.seconds:.1f}x the training time ({best.seconds:.0f} vs {worst.seconds:.0f} s)")
    return f" Cost of {answer.best} against {answer.worst}: " + ", ".join(parts) + "." if parts else ""


def to_settle(answer: Answer, precision: float, seconds_per_run: float) -> str:
    """How many more runs (and minutes) would make the CI exclude 0 or lie within +-precision, at this noise."""
    if answer.verdict == "insufficient_data":
        return f"{answer.runs_needed} more run(s) would make it answerable ({answer.why})"
    half = (answer.ci_high - answer.ci_low) / 2
    if not half > 0:
        return ""
    target = max(abs(answer.estimate), precision - abs(answer.estimate))  # the easier of the two ways to settle
    runs = sum(level.n for level in answer.levels)
    factor = (half / max(target, 1e-9)) ** 2
    more = max(1, math.ceil(runs * (factor - 1)))
    minutes = more * seconds_per_run / 60 if math.isfinite(seconds_per_run) else float("nan")
    cost = f" ({minutes:.0f} min)" if math.isfinite(minutes) else ""
    return f"about {more} more runs{cost} at this noise would settle it"


def factor_answer(analysis: Analysis, parameter: str, answer: Answer) -> str:
    n = ", ".join(f"{lv.value}: {pts(lv.adjusted, False)}% (n={lv.n}{f', {lv.failed} failed' if lv.failed else ''})"
                  for lv in answer.levels)
    ci = "95% simultaneous CI" if abs(answer.alpha - 0.05) < 1e-9 else f"simultaneous CI at error rate {answer.alpha:.3f}"
    head = f"**{label(parameter)}** (`{parameter}`"
    regime = analysis.regime
    at = (f"{regime.train_images:,} images x {regime.epochs} epochs" if regime.train_images and regime.epochs
          else "the study's regime")
    head += (f", {len(answer.levels) + len(answer.failing)} values, compared at equal epochs: {at})" if answer.kind == "categorical"
             else f", a slope: {at})")
    if answer.verdict == "insufficient_data":
        return f"{head}: not enough data to say: {answer.why}."
    if answer.kind != "categorical":
        unit = "per decade" if answer.kind == "log" else "per unit"
        text = (f"{head}: {answer.verdict.replace('_', ' ')}: {pts(answer.estimate)} points {unit} "
                f"({ci} {pts(answer.ci_low)} to {pts(answer.ci_high)}); over the searched range at most "
                f"{pts(answer.bound, False)} points.")
        return text
    words = {
        "effect": f"{answer.best} scores higher than {answer.worst}: best minus worst {pts(answer.estimate)} points "
                  f"({ci} {pts(answer.ci_low)} to {pts(answer.ci_high)})",
        "equivalent": f"equivalent within +-{pts(analysis.precision, False)} points: no two values differ by more than "
                      f"{pts(answer.bound, False)} points ({ci})",
        "not_detected": f"not settled: best ({answer.best}) minus worst ({answer.worst}) is {pts(answer.estimate)} "
                        f"points ({ci} {pts(answer.ci_low)} to {pts(answer.ci_high)}). No value is more than "
                        f"{pts(answer.bound, False)} points better than another (absence of evidence, not evidence of "
                        f"absence); a difference of {pts(answer.mde, False)} points would be detected with 80% power",
    }[answer.verdict]
    if answer.failing:
        words = _failure_words(answer, words)
    text = f"{head}: {words}. Adjusted means (model-based, not scores of single runs): {n}."
    if parameter == "kernel":
        text += _even_kernels(answer)
    if parameter == "train.batch_size":
        text += _batch_explained(analysis, answer)
    return text + _cost_phrase(analysis, answer)


def _failure_words(answer: Answer, words: str) -> str:
    """A value whose runs all failed is answered by its failure rate; the values that trained by their accuracy."""
    failing = "; ".join(f"{answer.parameter}={lv.value} failed in {lv.failed} of {lv.failed} runs (diverged or at chance)"
                        for lv in answer.failing)
    rates = "; ".join(f"{lv.value}: {lv.failed} of {lv.n + lv.failed}" for lv in answer.levels if lv.failed)
    test = (f"the failure rate differs between values (p={answer.failure_p:.2g})" if answer.failure_p < answer.alpha
            else f"the failure rates do not differ detectably (p={answer.failure_p:.2g})")
    among = (f"among the values that trained, best ({answer.best}) minus worst ({answer.worst}) is "
             f"{pts(answer.estimate)} points ({pts(answer.ci_low)} to {pts(answer.ci_high)})")
    accuracy = words if (answer.ci_low > 0 or answer.ci_high < 0) else among
    return f"{failing}: {test}{f' (failures elsewhere: {rates})' if rates else ''}; {accuracy}"


def _even_kernels(answer: Answer) -> str:
    even = [lv for lv in answer.levels if isinstance(lv.value, int) and lv.value % 2 == 0]
    if not even:
        return ""
    below = []
    for lv in even:
        pair = next((p for p in answer.pairs if {p[0], p[1]} == {lv.value, answer.best}), None)
        if pair is not None:
            low, high = (pair[3], pair[4]) if pair[0] == answer.best else (-pair[4], -pair[3])
            if low > 0:
                below.append(f"{lv.value} (at least {pts(low, False)} points below {answer.best})")
    return (" Even kernels train (same padding pads them asymmetrically): "
            + ("; ".join(below) + " score clearly below the best." if below else
               f"none of {', '.join(str(lv.value) for lv in even)} is shown worse than the best."))


def _batch_explained(analysis: Analysis, answer: Answer) -> str:
    rows = [a for a in analysis.batch_equal if a.difference is not None]
    missing = [f"{a.level} at {a.at:,.0f} {a.axis} ({a.why})" for a in analysis.batch_equal if a.difference is None]
    if not rows and not missing:
        return (" It compares at equal epochs, so smaller batches also make more updates; the study has no "
                "longer baseline to compare at equal updates.")
    parts, beyond = [], False
    for a in rows:
        d = a.difference
        parts.append(f"{a.level} at {a.at:,.0f} {a.axis}: {pts(d.estimate)} points ({pts(d.low)} to {pts(d.high)})")
        beyond |= a.axis == "updates" and (d.low > 0 or d.high < 0)
    verdict = ("batch size itself changes the score beyond the number of updates" if beyond else
               "the difference at equal epochs is explained by the number of updates: at equal updates no batch "
               "size differs from the baseline's curve")
    text = (" Against the baseline trained longer, read at the same number of updates and seconds (95% Welch CIs): "
            + "; ".join(parts) + f". So {verdict}.") if parts else ""
    return text + (" Not comparable: " + "; ".join(missing) + "." if missing else "")


def epochs_answer(analysis: Analysis) -> str:
    e = analysis.epochs
    head = "**3.ii Epochs**"
    if e is None or e.verdict == "insufficient_data":
        return f"{head}: not enough data to say{': ' + e.why if e is not None else ''}."
    best = (f"at or beyond {e.last_epoch}: the curve is still within noise of its best at the last epoch trained"
            if e.at_or_beyond else f"epoch {e.best_epoch} (epochs {e.plateau[0]}-{e.plateau[1]} are within noise of it)")
    text = f"{head} (the baseline trained to {e.last_epoch} epochs, {e.runs} runs): best epoch {best}."
    if e.gain is not None:
        text += (f" Training {e.last_epoch} instead of {e.base_epochs} epochs changes the score by {pts(e.gain.estimate)} "
                 f"points (CI {pts(e.gain.low)} to {pts(e.gain.high)}): "
                 + {"effect": "it matters", "equivalent": f"equivalent within +-{pts(analysis.precision, False)}",
                    "not_detected": "not settled"}[e.verdict] + ".")
    if e.overfits is not None:
        text += f" After epoch {e.best_epoch} it falls by {pts(-e.overfits.estimate, False)} points: it overfits."
    return text


def measured_answer(analysis: Analysis, arm: str, interval: Interval, n_test: int | None) -> str:
    """What an arm reaches, with its cost: measured, never given a verdict against another task."""
    cost = analysis.costs.get(cell_key({"task": arm}), Cost())
    binomial = ""
    if n_test and interval.n and math.isfinite(interval.estimate):
        half = 1.96 * math.sqrt(interval.estimate * (1 - interval.estimate) / n_test)
        binomial = f"; one run's binomial CI on its {n_test:,} test images is +-{pts(half, False)} points"
    return (f"**4 {arm} CNN**: reaches {pts(interval.estimate, False)}% test accuracy (95% CI {pts(interval.low, False)} "
            f"to {pts(interval.high, False)}% across {interval.n} seeds{binomial}), with {cost.params / 1e6:.2f}M "
            f"parameters, {cost.flops / 1e6:.0f} MFLOPs per image and {cost.seconds:.0f} s of training per run. It is "
            "not compared with the CIFAR-10 model: different data, model, training size and test set; a comparison "
            "needs both models on both datasets (a 2x2).")


def front_lines(analysis: Analysis) -> list[str]:
    """Accuracy against cost: the Pareto front, most accurate first, each with its reproduce command."""
    if not analysis.objectives:
        return []
    names = " against ".join(f"{m} ({d})" for m, d in analysis.objectives)
    lines = [f"## Accuracy against cost: {names}", "",
             f"The Pareto front: {len(analysis.front)} trials that no other beats on every objective"
             + (f" (trials {', '.join(map(str, analysis.infeasible))} break the constraints and are left out)"
                if analysis.infeasible else "") + "; the champion is the most accurate of them.", ""]
    for r in analysis.front:
        values = ", ".join(f"{m}={v:.4g}" for (m, _), v in zip(analysis.objectives, r.values or []))
        star = " **(champion, registered)**" if r.number == analysis.champion else ""
        lines += [f"- trial {r.number}{star}: {values}; {r.num_params or 0:,} parameters, "
                  f"{(r.flops or 0) / 1e6:.0f} MFLOPs per image; `{r.command}`"]
    return [*lines, ""]


def regime_line(analysis: Analysis) -> str:
    r = analysis.regime
    baseline = (f"; the baseline scores {pts(r.baseline.estimate, False)}% (n={r.baseline.n})" if r.baseline else "")
    def count(n):
        return f"{n:,}" if n else "?"

    return (f"Regime: {count(r.train_images)} training images per trial, {r.epochs or '?'} epochs, the score measured "
            f"on {count(r.eval_images)} held-out images{' shared by every trial' if analysis.design else ''}{baseline}."
            + (f" Data: {r.note}." if r.note else ""))


def plain_answers(analysis: Analysis, test_images: dict[str, int]) -> list[str]:
    """The answers section of summary.md: one paragraph per question, the regime and the error rates first."""
    questions = len(analysis.factors) + (analysis.epochs is not None)
    lines = [f"## Answers ({analysis.metric}, in accuracy points)", "", regime_line(analysis), "",
             f"Each verdict holds at a {analysis.alpha:.0%} error rate over all of the study's looks; with {questions} "
             f"questions the chance that at least one verdict is wrong is at most {min(1, questions * analysis.alpha):.0%} "
             "(Bonferroni). `effect`: a CI excludes 0; `equivalent`: every CI lies within "
             f"+-{pts(analysis.precision, False)} points (answers.precision); `not settled`: neither.", ""]
    ordered = sorted(analysis.factors, key=lambda p: next((i for i, (_, pat) in enumerate(QUESTIONS) if pat.match(p)), 99))
    for parameter in ordered:
        lines += [factor_answer(analysis, parameter, analysis.factors[parameter]), ""]
    if analysis.epochs is not None or (analysis.design and analysis.design.get("curve_arm")):
        lines += [epochs_answer(analysis), ""]
    for arm, interval in analysis.measured.items():
        lines += [measured_answer(analysis, arm, interval, test_images.get(arm)), ""]
    lines += front_lines(analysis)
    return lines


__all__ = ["plain_answers", "to_settle", "pts", "label", "critical"]


def transfer_lines(here: Analysis, name: str, there: Analysis) -> list[str]:
    """Per question: does the verdict hold in both regimes (same verdict, and an effect picks the same best value)?"""
    lines = [f"## Do the answers transfer? This study against `{name}`", "",
             f"Here: {regime_line(here)}", f"There: {regime_line(there)}", ""]
    for parameter in [p for p in here.factors if p in there.factors]:
        a, b = here.factors[parameter], there.factors[parameter]
        same = a.verdict == b.verdict and (a.verdict != "effect" or a.best == b.best)
        word = "holds in both" if same and a.settled() else ("both unsettled" if same else "differs")
        lines.append(f"- {label(parameter)}: here {a.verdict}" + (f" (best {a.best})" if a.verdict == "effect" else "")
                     + f", there {b.verdict}" + (f" (best {b.best})" if b.verdict == "effect" else "") + f": {word}.")
    if here.epochs is not None and there.epochs is not None:
        same = here.epochs.verdict == there.epochs.verdict
        lines.append(f"- 3.ii Epochs: here {here.epochs.verdict}, there {there.epochs.verdict}: "
                     + ("holds in both." if same else "differs."))
    return [*lines, ""]

"""The answers in plain words, from an `Analysis`: the last step turns numbers into words.

Every answer states what it compares at (equal epochs, updates or seconds) and in which regime, its
estimate with a CI labelled with the error rate it holds at, the n of each value's own cell, its
cost from the configurations it compares, and, unsettled, what would settle it. The words are
made from the same numbers `effects.csv` carries: an `effect` names the pairs whose CI excludes 0.
Questions are named as the sweep file names them (`design.questions`); nothing here knows a
parameter by name.
"""

from __future__ import annotations

import math

from cnnexp.design import TASK, Question, config_key
from cnnexp.reporting.analysis import Analysis, Cost
from cnnexp.stats.curves import Interval
from cnnexp.stats.effects import Answer


def pts(value: float, sign: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "?"
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def level(alpha: float, simultaneous: bool = False) -> str:
    """How an interval is labelled: the level it was computed at, never a bare '95%' for another one."""
    kind = "simultaneous CI" if simultaneous else "CI"
    return f"{100 * (1 - alpha):.4g}% {kind}" + ("" if abs(alpha - 0.05) < 1e-12 else f" (error rate {alpha:.3g})")


def question(analysis: Analysis, key: str) -> Question:
    """The question a key answers, as the sweep file names it (a search's parameter: the key itself)."""
    design = analysis.design
    if design is not None and key in design.questions:
        return design.questions[key]
    return Question(key=key, kind="factor", label=key)


def label(analysis: Analysis, key: str) -> str:
    return question(analysis, key).title


def _cell_cost(analysis: Analysis, key: str, value) -> Cost | None:
    design = analysis.design
    if not design:
        return None
    return analysis.costs.get(config_key({TASK: design.main, **{k: design.baseline[k] for k in design.vary},
                                          key: value}))


def _cost_phrase(analysis: Analysis, answer: Answer) -> str:
    """Cost of the pair the answer reports, from their own cells (never mixing in another factor)."""
    higher, lower = answer.pair or (answer.best, answer.worst)
    a, b = _cell_cost(analysis, answer.parameter, higher), _cell_cost(analysis, answer.parameter, lower)
    if a is None or b is None:
        return ""
    parts = []
    if a.flops and b.flops and math.isfinite(a.flops):
        parts.append(f"{a.flops / b.flops:.1f}x the FLOPs per image "
                     f"({a.flops / 1e6:.0f} vs {b.flops / 1e6:.0f} MFLOPs)")
    if a.params and b.params and math.isfinite(a.params):
        parts.append(f"{a.params / b.params:.1f}x the parameters")
    if a.seconds and b.seconds and math.isfinite(a.seconds):
        parts.append(f"{a.seconds / b.seconds:.1f}x the training time ({a.seconds:.0f} vs {b.seconds:.0f} s)")
    return f" Cost of {higher} against {lower}: " + ", ".join(parts) + "." if parts else ""


def cell_n(level_) -> int:
    """The runs a value's own cell holds (in a design), else the runs with that value."""
    return level_.cell_n or level_.n


def to_settle(answer: Answer, margin: float, seconds_per_run: float, finished: bool) -> str:
    """How many more runs (and minutes) would make the CI exclude 0 or lie within +-margin, at this noise.

    Once the study's last look has spent its error rate, more runs can't be added to it: they are offered
    as a new study with its own error budget, in those words.
    """
    if answer.verdict == "insufficient_data":
        return f"{answer.runs_needed} more run(s) would make it answerable ({answer.why})"
    half = (answer.ci_high - answer.ci_low) / 2
    if not half > 0:
        return ""
    target = max(abs(answer.estimate), margin - abs(answer.estimate))  # the easier of the two ways to settle
    runs = sum(cell_n(lv) for lv in answer.levels)
    factor = (half / max(target, 1e-9)) ** 2
    minutes = lambda n: f" ({n * seconds_per_run / 60:.0f} min)" if math.isfinite(seconds_per_run) else ""  # noqa: E731
    if finished:
        total = max(runs, math.ceil(runs * factor))
        return (f"a new study with its own error budget would need about {total} runs{minutes(total)} at this noise "
                "to settle it (this study's error rate is spent: its runs can't be added to)")
    more = max(1, math.ceil(runs * (factor - 1)))
    return f"about {more} more runs{minutes(more)} at this noise would settle it"


def factor_answer(analysis: Analysis, key: str, answer: Answer) -> str:
    q = question(analysis, key)
    n = ", ".join(f"{lv.value}: {pts(lv.adjusted, False)}% "
                  f"(n={cell_n(lv)}{f', {lv.failed} failed' if lv.failed else ''})"
                  for lv in answer.levels)
    regime = analysis.regime
    at = (f"{regime.train_images:,} images x {regime.epochs} epochs" if regime.train_images and regime.epochs
          else "the study's regime")
    head = f"**{q.title}** (`{key}`"
    head += (f", {len(answer.levels) + len(answer.failing)} values, compared at equal epochs: {at})"
             if answer.kind == "categorical" else f", a slope: {at})")
    ci = level(answer.alpha, simultaneous=answer.kind == "categorical")
    if answer.verdict == "insufficient_data":
        return f"{head}: not enough data to say: {answer.why}."
    if answer.kind != "categorical":
        unit = "per decade" if answer.kind == "log" else "per unit"
        return (f"{head}: {answer.verdict.replace('_', ' ')}: {pts(answer.estimate)} points {unit} "
                f"({ci} {pts(answer.ci_low)} to {pts(answer.ci_high)}); over the searched range at most "
                f"{pts(answer.bound, False)} points.")
    words = {
        "effect": _effect_words(answer, ci),
        "equivalent": f"equivalent within +-{pts(analysis.margin, False)} points: no two values differ by more than "
                      f"{pts(answer.bound, False)} points ({ci})",
        "not_detected": f"not settled: best ({answer.best}) minus worst ({answer.worst}) is {pts(answer.estimate)} "
                        f"points, and its {ci} {pts(answer.ci_low)} to {pts(answer.ci_high)} covers 0. No value is "
                        f"more than {pts(answer.bound, False)} points better than another (absence of evidence, not "
                        f"evidence of absence); a difference of {pts(answer.mde, False)} points would be detected "
                        "with 80% power",
    }[answer.verdict]
    if answer.failing or math.isfinite(answer.failure_p):
        words = _failure_words(answer, words)
    text = f"{head}: {words}. Adjusted means (model-based, not scores of single runs): {n}."
    text += _clearly_below(answer, ci) + (f" {q.note}" if q.note else "")
    text += at_equal_words(analysis, key) + _confirmed(analysis, key)
    return text + _cost_phrase(analysis, answer)


def _effect_words(answer: Answer, ci: str) -> str:
    """'3 and 4 score higher than 2': every pair whose CI excludes 0, then the largest with its CI."""
    by_lower: dict = {}
    for higher, lower, *_ in answer.decisive:
        by_lower.setdefault(lower, []).append(higher)
    said = "; ".join(f"{' and '.join(map(str, highers))} score{'s' * (len(highers) == 1)} higher than {lower}"
                     for lower, highers in by_lower.items())
    higher, lower = answer.pair
    return (f"{said} (the largest: {higher} over {lower}, {pts(answer.estimate)} points, {ci} {pts(answer.ci_low)} to "
            f"{pts(answer.ci_high)})")


def _failure_words(answer: Answer, words: str) -> str:
    """Where runs failed, their rate per value is tested at its share of the question's error rate."""
    failing = "; ".join(f"{answer.parameter}={lv.value} failed in {lv.failed} of {lv.failed} runs "
                        "(diverged or at chance)"
                        for lv in answer.failing)
    rates = "; ".join(f"{lv.value}: {lv.failed} of {lv.n + lv.failed}" for lv in answer.levels if lv.failed)
    test = (f"the failure rate differs between values (p={answer.failure_p:.2g} "
            f"at error rate {answer.failure_alpha:.3g})"
            if answer.failure_p < answer.failure_alpha else
            f"the failure rates do not differ detectably (p={answer.failure_p:.2g}, "
            f"error rate {answer.failure_alpha:.3g})")
    lead = f"{failing}: " if failing else ""
    return f"{lead}{test}{f' (failures: {rates})' if rates else ''}; among the runs that trained, {words}"


def _clearly_below(answer: Answer, ci: str) -> str:
    """Which values score clearly below the best (their CI against it excludes 0), or that none does."""
    below = [(lower, low) for higher, lower, _, low, _ in answer.decisive if higher == answer.best]
    if not below or answer.verdict != "effect":
        return ""
    return " Clearly below the best (" + str(answer.best) + "): " + "; ".join(
        f"{value} (at least {pts(low, False)} points)" for value, low in below) + f" ({ci})."


def at_equal_words(analysis: Analysis, key: str) -> str:
    """A factor's values against the baseline's long curve at the same updates and seconds: said plainly."""
    compared = analysis.at_equal.get(key, [])
    if not compared:
        return ""
    parts, directions = [], []
    base = analysis.design.baseline[key] if analysis.design else None
    for axis in dict.fromkeys(a.axis for a in compared):
        rows = [a for a in compared if a.axis == axis]
        said = [f"{a.level} at {a.at:,.0f} {axis}: {pts(a.difference.estimate)} points ({pts(a.difference.low)} to "
                f"{pts(a.difference.high)})" if a.difference is not None else f"{a.level}: not comparable ({a.why})"
                for a in rows]
        parts.append("; ".join(said))
        clear = [a for a in rows if a.difference is not None and (a.difference.low > 0 or a.difference.high < 0)]
        if clear and base is not None and all(_sign(a, base) == _sign(clear[0], base) for a in clear):
            directions.append(f"per {axis[:-1] if axis.endswith('s') else axis}, larger values score "
                              f"{'higher' if _sign(clear[0], base) > 0 else 'lower'}")
    alpha = compared[0].difference.alpha if compared[0].difference is not None else analysis.alpha
    text = (f" Against the baseline ({base}) trained longer, read at each value's own number of updates and seconds "
            f"(Welch CIs at error rate {alpha:.3g} each: the look's rate split over its {len(compared)} comparisons): "
            + "; ".join(parts) + ".")
    if directions:
        text += " So " + "; ".join(directions) + "."
    return text + (" At equal images seen this is the comparison at equal epochs above: every value sees the same "
                   "images per epoch.")


def _sign(compared, base) -> int:
    """+1 when the difference and the value's distance from the baseline have the same sign."""
    try:
        return 1 if (compared.difference.estimate > 0) == (float(compared.level) > float(base)) else -1
    except (TypeError, ValueError):
        return 1 if compared.difference.estimate > 0 else -1


def _confirmed(analysis: Analysis, key: str) -> str:
    said = analysis.confirmations.get(key)
    if not said:
        return ""
    rung = f" at {said['rung']:,} training images" if said.get("rung") else ""
    if said["verdict"] == "not checked":
        return f" Holds at a higher fidelity: {said['why']}."
    first = said["pairs"][0]
    return (f" Holds{rung} ({len(said['pairs'])} pair(s) re-run, a few seeds each): {said['verdict']} "
            f"({first['higher']} over {first['lower']}: {pts(first['estimate'])} points, {level(said['alpha'])} "
            f"{pts(first['low'])} to {pts(first['high'])}).")


def epochs_answer(analysis: Analysis) -> str:
    e = analysis.epochs
    head = f"**{label(analysis, 'train.epochs')}**"
    if e is None or e.verdict == "insufficient_data":
        return f"{head}: not enough data to say{': ' + e.why if e is not None else ''}."
    best = (f"at or beyond {e.last_epoch}: the curve is still within noise of its best at the last epoch trained"
            if e.at_or_beyond else
            f"epoch {e.best_epoch} (epochs {e.plateau[0]}-{e.plateau[1]} are within noise of it)")
    text = f"{head} (the baseline trained to {e.last_epoch} epochs, {e.runs} runs): best epoch {best}."
    if e.gain is not None:
        text += (f" Training {e.last_epoch} instead of {e.base_epochs} epochs changes the score by "
                 f"{pts(e.gain.estimate)} points ({level(e.gain.alpha)} {pts(e.gain.low)} to {pts(e.gain.high)}, "
                 "paired by run): "
                 + {"effect": "it matters", "equivalent": f"equivalent within +-{pts(analysis.margin, False)}",
                    "not_detected": "not settled"}[e.verdict] + ".")
    if e.overfits is not None:
        text += f" After epoch {e.best_epoch} it falls by {pts(-e.overfits.estimate, False)} points: it overfits."
    return text


def measured_answer(analysis: Analysis, arm: str, interval: Interval, n_test: int | None) -> str:
    """What an arm reaches, with its cost: measured, never given a verdict against another task."""
    cost = analysis.costs.get(config_key({TASK: arm}), Cost())
    binomial = ""
    if n_test and interval.n and math.isfinite(interval.estimate):
        half = 1.96 * math.sqrt(interval.estimate * (1 - interval.estimate) / n_test)
        binomial = f"; one run's 95% binomial CI on its {n_test:,} test images is +-{pts(half, False)} points"
    main = analysis.design.main if analysis.design else "main"
    return (f"**{label(analysis, arm)}**: reaches {pts(interval.estimate, False)}% test accuracy "
            f"({level(interval.alpha)} {pts(interval.low, False)} to {pts(interval.high, False)}% across "
            f"{interval.n} seeds{binomial}), with {cost.params / 1e6:.2f}M parameters, {cost.flops / 1e6:.0f} MFLOPs "
            f"per image and {cost.seconds:.0f} s of training per run. It is not compared with the {main} task: "
            "different data, model, training size and test set; a comparison needs both models on both datasets "
            "(a 2x2).")

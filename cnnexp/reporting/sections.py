"""The sections of summary.md that put the answers together: the regime, the answers in order, the Pareto
front, and whether the answers transfer to another study's regime."""

from __future__ import annotations

from cnnexp.reporting.analysis import Analysis
from cnnexp.reporting.prose import epochs_answer, factor_answer, label, measured_answer, pts


def regime_line(analysis: Analysis) -> str:
    r = analysis.regime
    baseline = (f"; the baseline scores {pts(r.baseline.estimate, False)}% (n={r.baseline.n})" if r.baseline else "")

    def count(n):
        return f"{n:,}" if n else "?"

    text = (f"Regime: {count(r.train_images)} training images per trial, {r.epochs or '?'} epochs, the score measured "
            f"on {count(r.eval_images)} held-out images{' shared by every trial' if analysis.design else ''}{baseline}."
            + (f" Data: {r.note}." if r.note else ""))
    if r.plan is not None:
        how = "pinned by the command line" if r.plan.pinned else f"the rung the plan chose on {r.plan.device}"
        text += (f" Training-set size: {r.plan.train_limit:,}, {how}; `{r.plan.pin}` reproduces this regime on any "
                 "machine.")
    return text


def answer_paragraphs(analysis: Analysis, test_images: dict[str, int]) -> list[str]:
    """The answers section of summary.md: one paragraph per question, the regime and the error rates first."""
    questions = len(analysis.factors) + (analysis.epochs is not None)
    lines = [f"## Answers ({analysis.metric}, in accuracy points)", "", regime_line(analysis), ""]
    if analysis.provisional:
        lines += ["No look has been taken yet (the first round is still running): these answers are provisional, "
                  "at the first look's error rate, and decide nothing.", ""]
    lines += [f"Each verdict holds at a {analysis.alpha:.0%} error rate over all of the study's looks (every interval "
              f"says the rate it was computed at); with {questions} questions the chance that at least one verdict is "
              f"wrong is at most {min(1, questions * analysis.alpha):.0%} (Bonferroni). `effect`: a CI excludes 0, and "
              f"the pairs it names are those whose CI does; `equivalent`: every CI lies within "
              f"+-{pts(analysis.margin, False)} points (answers.margin); `not settled`: neither.", ""]
    order = list(analysis.design.questions) if analysis.design else list(analysis.factors)
    for key in [k for k in order if k in analysis.factors] + [k for k in analysis.factors if k not in order]:
        lines += [factor_answer(analysis, key, analysis.factors[key]), ""]
    if analysis.epochs is not None or (analysis.design and analysis.design.curve_arm):
        lines += [epochs_answer(analysis), ""]
    for arm, interval in analysis.measured.items():
        lines += [measured_answer(analysis, arm, interval, test_images.get(arm)), ""]
    return lines + front_lines(analysis)


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


def transfer_lines(here: Analysis, name: str, there: Analysis) -> list[str]:
    """Per question: does the verdict hold in both regimes (same verdict, and an effect the same direction)?"""
    lines = [f"## Do the answers transfer? This study against `{name}`", "",
             f"Here: {regime_line(here)}", f"There: {regime_line(there)}", "",
             "| question | here | there | holds? |", "|---|---|---|---|"]
    for key in [k for k in here.factors if k in there.factors]:
        a, b = here.factors[key], there.factors[key]
        same = a.verdict == b.verdict and (a.verdict != "effect" or a.pair == b.pair)
        word = "holds in both" if same and a.settled() else ("both unsettled" if same else "differs")
        lines.append(f"| {label(here, key)} | {_said(a)} | {_said(b)} | {word} |")
    if here.epochs is not None and there.epochs is not None:
        same = here.epochs.verdict == there.epochs.verdict
        lines.append(f"| {label(here, 'train.epochs')} | {here.epochs.verdict} | {there.epochs.verdict} | "
                     + ("holds in both" if same else "differs") + " |")
    return [*lines, ""]


def _said(answer) -> str:
    if answer.verdict == "effect" and answer.pair:
        return f"effect ({answer.pair[0]} over {answer.pair[1]}, {pts(answer.estimate)})"
    return answer.verdict.replace("_", " ")

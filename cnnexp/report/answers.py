"""The notebook's questions answered in plain words, from the effects and the trials' cost.

One short paragraph per question that the study can answer: 2.i kernel size (and whether even
kernels work), 2.ii filters, 3.i batch size, 3.ii epochs, 4 the MNIST CNN. Every answer gives the
estimate with its 95% confidence interval, or says that there is not enough data and what would
settle it, and the cost (parameters, FLOPs per image, training seconds) beside the accuracy.
"""

from __future__ import annotations

import math
import re

import pandas as pd

QUESTIONS = [  # (question, how to recognise its parameter)
    ("2.i Kernel size", re.compile(r"^(kernel|model\.layers\.\d+\.kernel)$")),
    ("2.ii Filters", re.compile(r"^(width|filters|model\.layers\.\d+\.filters)$")),
    ("3.i Batch size", re.compile(r"^train\.batch_size$")),
    ("3.ii Epochs", re.compile(r"^train\.epochs$")),
    ("4 MNIST CNN vs CIFAR-10 model", re.compile(r"^(dataset|task)$")),
]


def points(value: float) -> str:
    return f"{100 * value:+.1f}" if math.isfinite(value) else "?"


def level_means(text) -> dict[str, tuple[float, int]]:
    """Parse stats' `levels` text ("3: 0.512 (n=4), 5: 0.530 (n=4)") into {level: (mean, n)}."""
    out = {}
    for level, mean, n in re.findall(r"([^,:]+):\s*(-?[\d.]+(?:e-?\d+)?)\s*\(n=(\d+)\)", str(text or "")):
        out[level.strip()] = (float(mean), int(n))
    return out


def cost_per_level(frame: pd.DataFrame, param: str) -> pd.DataFrame:
    """Median parameters, FLOPs per image and training seconds of the complete trials at each level."""
    done = frame[frame["state"] == "COMPLETE"]
    columns = [c for c in ("n_params", "flops", "train_s") if c in done]
    if done.empty or param not in done or not columns:
        return pd.DataFrame()
    cost = done.groupby(done[param].astype(str))[columns].median()
    return cost


def cost_phrase(cost: pd.DataFrame, best: str, worst: str) -> str:
    if cost.empty or best not in cost.index or worst not in cost.index:
        return ""
    parts = []
    if "flops" in cost and cost.loc[worst, "flops"]:
        parts.append(f"{cost.loc[best, 'flops'] / cost.loc[worst, 'flops']:.1f}x the FLOPs per image "
                     f"({cost.loc[best, 'flops'] / 1e6:.0f} vs {cost.loc[worst, 'flops'] / 1e6:.0f} MFLOPs)")
    if "n_params" in cost and cost.loc[worst, "n_params"]:
        parts.append(f"{cost.loc[best, 'n_params'] / cost.loc[worst, 'n_params']:.1f}x the parameters")
    if "train_s" in cost and cost.loc[worst, "train_s"]:
        parts.append(f"{cost.loc[best, 'train_s'] / cost.loc[worst, 'train_s']:.1f}x the training time")
    return f" Cost of {best} against {worst}: " + ", ".join(parts) + "." if parts else ""


def answer(question: str, row: dict, frame: pd.DataFrame) -> str:
    param, verdict = row["parameter"], row["verdict"]
    estimate, low, high = (float(row.get(k)) if row.get(k) is not None else float("nan")
                           for k in ("estimate", "ci_low", "ci_high"))
    means = level_means(row.get("levels"))
    ci = f"95% CI {points(low)} to {points(high)} points" if math.isfinite(low) else "no CI yet"
    if verdict == "insufficient_data":
        return f"**{question}** (`{param}`): not enough data to say. {row.get('needed') or ''}".strip()
    if param == "train.epochs" and "gain_last_epoch" in row:
        gain, (glow, ghigh) = row["gain_last_epoch"], row.get("gain_last_ci", (float("nan"), float("nan")))
        more = ("the last epoch still added " if glow > 0 else "the last epoch added ") + \
            f"{points(gain)} points (95% CI {points(glow)} to {points(ghigh)})"
        head = "more epochs help" if verdict == "effect" else "no gain from more epochs detected"
        return (f"**{question}**: {head}: validation accuracy after the last epoch is {points(estimate)} points "
                f"above epoch 1 ({ci}); {more}. Best epoch: {row.get('best_value')}.")
    if param == "task":
        arm, main = list(means)[:2] if len(means) >= 2 else ("the arm", "the baseline")
        text = (f"**{question}**: {arm} reaches {100 * means[arm][0]:.1f}% test accuracy (n={means[arm][1]}), "
                f"the {main} baseline {100 * means[main][0]:.1f}% (n={means[main][1]}): a difference of "
                f"{points(estimate)} points ({ci}).")
        return text + cost_phrase(cost_per_level(frame, param), arm, main)
    if not means:  # continuous parameter: a slope
        direction = "higher" if estimate > 0 else "lower"
        word = "raises" if verdict == "effect" else "shows no detectable effect on"
        return (f"**{question}** (`{param}`): {word} the score ({points(estimate)} points per unit, {ci}); "
                f"best at {row.get('best_value')} ({direction} is better)." if verdict == "effect" else
                f"**{question}** (`{param}`): no effect detected ({points(estimate)} points per unit, {ci}).")
    ordered = sorted(means.items(), key=lambda kv: kv[1][0], reverse=True)
    (best, (best_mean, _)), (worst, (worst_mean, _)) = ordered[0], ordered[-1]
    cost = cost_per_level(frame, param)
    if verdict == "effect":
        text = (f"**{question}** (`{param}`): {best} scores {points(best_mean - worst_mean)} points more than {worst} "
                f"({ci}, after comparing all {len(means)} values).")
    else:
        text = (f"**{question}** (`{param}`): no effect detected: best minus worst is {points(estimate)} points "
                f"({ci}).")
        detectable = re.search(r"power: (-?[\d.]+)", str(row.get("needed") or ""))
        if detectable:
            text += (f" With this many runs only an effect larger than about {100 * float(detectable[1]):.1f} points "
                     "would be detected reliably (80% power); more seeds would settle smaller ones.")
    if question.startswith("2.i"):
        even = [level for level in means if level.lstrip("-").isdigit() and int(level) % 2 == 0]
        if even:
            margin = (high - low) / 2 if math.isfinite(low) else float("nan")
            fine = [lv for lv in even if best_mean - means[lv][0] <= margin]
            text += (f" Even kernels train fine ({', '.join(even)}: within noise of the best)." if len(fine) == len(even)
                     else f" Even kernels train: {', '.join(f'{lv} scores {100 * means[lv][0]:.1f}%' for lv in even)}.")
    return text + cost_phrase(cost, best, worst)


def answers(study, frame: pd.DataFrame, effects: pd.DataFrame, facts: dict, metric: str) -> list[str]:
    """The answers section of summary.md: one paragraph per question this study can answer."""
    lines = [f"## Answers ({metric}, in accuracy points; 95% confidence intervals)", ""]
    rows = effects.to_dict("records")
    if "epochs_row" in facts:
        rows = [r for r in rows if r["parameter"] != "train.epochs"] + [facts["epochs_row"]]
    found = False
    for question, pattern in QUESTIONS:
        for row in rows:
            if pattern.match(str(row["parameter"])):
                lines += [answer(question, row, frame), ""]
                found = True
    for row in rows:  # anything else the user searched
        if not any(p.match(str(row["parameter"])) for _, p in QUESTIONS):
            lines += [answer(str(row["parameter"]), row, frame), ""]
            found = True
    if not found:
        lines.append("No parameter was searched.")
    for note in facts.get("notes", []):
        lines += [f"Note: {note}.", ""]
    return lines

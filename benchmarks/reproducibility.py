"""Same command, same answers? From a finished designed study's recorded noise and estimates, simulate the study
many times with the real rules and say, per question, how likely two runs of it are to give the same verdict.

    python benchmarks/reproducibility.py seed_questions --storage sqlite:///studies.db [--studies 200]

The truth plugged in is the study's own: each value's adjusted mean against the baseline (the last look's), the
noise between runs of a configuration (its pooled SD), and each configuration's shared luck on the evaluation images
(measured from the runs' right/wrong per image). Every simulated study runs the real procedure (its first round,
its looks, its allocation). The probability that two independent runs agree on a question is sum_v p_v^2 over
its verdicts v. Writes outputs/bench/reproducibility.json.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from cnnexp import record
from cnnexp.reporting.analysis import analyse
from cnnexp.stats.simulate import Simulator, sequential_study
from cnnexp.study.optuna_study import load_study
from cnnexp.study.settings import answers_settings

OUT = Path("outputs/bench")


def plugged_in(study_name: str, storage: str) -> tuple:
    """(design, effects, sigma, offset_sd, answers settings) as the finished study measured them."""
    study = load_study(study_name, storage)
    facts = record.read_study(study)
    if facts.design is None or not facts.rounds:
        raise SystemExit(f"{study_name} is not a finished designed study (no design or no look recorded).")
    answers = answers_settings(facts.answers)
    analysis = analyse(study, record.read_trials(study), facts, answers)
    effects = {}
    for key, answer in analysis.factors.items():
        base = facts.design.baseline[key]
        means = {lv.value: lv.adjusted for lv in answer.levels if math.isfinite(lv.adjusted)}
        if base in means:
            effects[key] = {value: mean - means[base] for value, mean in means.items() if value != base}
    noise = analysis.noise
    offset = noise.eval_sd / math.sqrt(2) if math.isfinite(noise.eval_sd) else 0.0  # a contrast holds two offsets
    return facts.design, effects, noise.sd, offset, answers, analysis


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--storage", default="sqlite:///studies.db")
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    design, effects, sigma, offset, answers, analysis = plugged_in(args.study, args.storage)
    rng = np.random.default_rng(args.seed)
    images = analysis.regime.eval_images or 3000
    verdicts = [sequential_study(Simulator(rng, design, effects, sigma, offset, images), float(answers.margin),
                                 int(answers.looks), float(answers.alpha)) for _ in range(args.studies)]
    rows = {}
    for key in design.vary:
        counts = Counter(v[key] for v in verdicts)
        shares = {verdict: n / len(verdicts) for verdict, n in counts.items()}
        rows[key] = {"verdicts": shares, "agreement": sum(p ** 2 for p in shares.values()),
                     "observed": analysis.factors[key].verdict if key in analysis.factors else None}
    result = {"study": args.study, "studies": args.studies, "sigma": sigma, "offset_sd": offset, "images": images,
              "effects": {k: {str(v): d for v, d in e.items()} for k, e in effects.items()}, "questions": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "reproducibility.json").write_text(json.dumps(result, indent=2))
    print(f"{args.studies} simulated runs of {args.study} (SD {100 * sigma:.2f} points between runs, offset "
          f"{100 * offset:.2f} points per configuration on {images:,} evaluation images):")
    print(f"{'question':20} {'observed':14} {'P(same verdict twice)':>22}  verdicts")
    for key, row in rows.items():
        said = ", ".join(f"{v} {p:.0%}" for v, p in sorted(row["verdicts"].items(), key=lambda kv: -kv[1]))
        print(f"{key:20} {str(row['observed']):14} {row['agreement']:22.0%}  {said}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

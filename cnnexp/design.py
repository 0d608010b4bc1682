"""Designed studies as typed values: the cells, the arms, and the questions they answer.

To answer "does X change the score, and by how much?", an optimiser is the wrong tool: it spends
its trials where the score is high, not where the comparison is informative. A design varies one
factor at a time around the baseline, trains each cell with several seeds (genuine replicates),
and adds *arms*: the baseline trained longer (the epochs question), and other tasks reported
beside it (the notebook's MNIST CNN). A sweep YAML asks for one with a `design:` block:

    design:
      seeds: 3                          # first-round replicates of every cell
      baseline: {kernel: 3, width: 0.5, train.batch_size: 100}
      vary: {kernel: [2, 3, 4, 5, 6, 7], width: [0.25, 0.5, 1.0], train.batch_size: [32, 100, 256]}
      main: cifar10                     # the name of the baseline's task
      epochs: [2, 4]                    # the baseline also trained 2x and 4x longer
      arms: {mnist: [dataset=mnist, model=mnist_cnn]}
      questions:                        # how the report numbers and names them (optional)
        kernel: {number: 2.i, label: Kernel size, note: "Even kernels train: same padding pads them asymmetrically."}
        train.batch_size: {number: 3.i, label: Batch size, compare_at: [updates, seconds]}

The questions are data: a factor of `vary` is compared at equal epochs (and, with `compare_at`,
against the baseline's long curve at equal updates or seconds), `train.epochs` is the long curve's
question, and every other arm is measured. Adding one is an edit of the sweep file alone.

The baseline is shared by every comparison, so it gets about sqrt(k) times the seeds of the other
cells (k: the cells compared with it), the allocation that minimises the comparisons' variance.

With a constant learning rate and no early stopping, epoch e of a longer run is exactly a run of e
epochs, so one arm at the longest multiple answers every multiple from its learning curve (its
seeds start at `EPOCH_SEEDS`, so that its first epochs are never a copy of a baseline trial, and
its value at the baseline's epochs counts as a baseline replicate). With a schedule or early
stopping, curves of different lengths are not comparable: each multiple is a cell of its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from cnnexp.errors import ConfigError

TASK = "task"
SEED_KEY = "train.seed"
EPOCHS = "train.epochs"
EPOCH_SEEDS = 1000  # seeds of the epochs arm start here: never the baseline's own seeds
# Seeds of one cell trained side by side as one model of k towers (cnnexp.train.towers); the default is what
# measured fastest on the 2-core CPU (`make bench`, runs per hour; README, 2026-12-06): one at a time, each on
# the cell's one compiled model (1.45x today's runs per hour), where 2, 4 and 8 towers gave 1.36x, 1.13x, 1.01x.
REPLICATES_PER_MODEL = 1
FACTOR, CURVE, ARM = "factor", "curve", "arm"
AXES = ("updates", "seconds", "images")  # what a factor may also be compared at, against the long curve


def config_key(values: dict) -> str:
    """A configuration's one identity: its values in key order (`kernel=5,task=cifar10`), the seed left out."""
    return ",".join(f"{k}={values[k]}" for k in sorted(values) if k != SEED_KEY)


SHORT = {"kernel": "k", "width": "w", "filters": "f", "train.batch_size": "bs", "train.epochs": "ep",
         "train.lr": "lr", "train.seed": "seed", "train.optimizer": "", "model": "", "dataset": "", "task": ""}


def short_label(values: dict) -> str:
    """Short words for a configuration, e.g. 'k5 bs64' (run names, terminal lines)."""
    parts = []
    for key, value in values.items():
        label = SHORT.get(key, key.rsplit(".", 1)[-1] + "=")
        parts.append(f"{label}{value:g}" if isinstance(value, float) else f"{label}{value}")
    return " ".join(parts)


@dataclass(frozen=True)
class Question:
    """One question a design answers: a factor compared, the long curve, or an arm measured."""

    key: str                       # the varied key, `train.epochs`, or the arm's name
    kind: str                      # factor | curve | arm
    number: str = ""               # e.g. "2.i" (the notebook's numbering)
    label: str = ""                # e.g. "Kernel size"
    note: str = ""                 # said with the answer
    compare_at: tuple[str, ...] = ()  # a factor also read against the long curve at equal updates/seconds/images

    @property
    def title(self) -> str:
        return " ".join(part for part in (self.number, self.label or self.key) if part)


@dataclass
class Design:
    seeds: int
    baseline: dict
    vary: dict[str, list]
    main: str
    arms: dict[str, list[str]]                     # every arm's own overrides (the epoch arms included)
    epochs: list[int] = field(default_factory=list)  # multiples of train.epochs the baseline is trained for
    epoch_arms: dict[str, int] = field(default_factory=dict)  # arm -> its epochs (set by `add_epoch_arms`)
    curve_arm: str | None = None                   # the one epoch arm whose curve answers every multiple
    base_epochs: int = 0                           # train.epochs of the main task's cells
    questions: dict[str, Question] = field(default_factory=dict)  # key -> question, in the report's order
    replicates_per_model: int = REPLICATES_PER_MODEL  # seeds of a cell trained side by side (1: one by one)

    def add_epoch_arms(self, base_epochs: int, constant_schedule: bool, plus: set[str]) -> None:
        """The arms that train the baseline longer; `plus`: the baseline keys that need '+' (shortcuts)."""
        self.base_epochs = base_epochs
        multiples = sorted(m for m in self.epochs if m > 1)
        if not multiples:
            return
        baseline = [f"{'+' if key in plus else ''}{key}={value}" for key, value in self.baseline.items()]
        for multiple in ([multiples[-1]] if constant_schedule else multiples):
            name = f"epochs_x{multiple}"
            self.arms[name] = [*baseline, f"train.epochs={base_epochs * multiple}", f"train.seed={EPOCH_SEEDS}"]
            self.epoch_arms[name] = base_epochs * multiple
        self.curve_arm = f"epochs_x{multiples[-1]}" if constant_schedule else None
        self.questions = _questions(self, {k: asdict(q) for k, q in self.questions.items()})

    # --- the cells -------------------------------------------------------------------------------------------
    def main_cells(self) -> list[dict]:
        """The baseline first, then one factor changed at a time."""
        base = {key: self.baseline[key] for key in self.vary}
        cells = [{TASK: self.main, **base}]
        for key, levels in self.vary.items():
            cells += [{TASK: self.main, **base, key: level} for level in levels if level != self.baseline[key]]
        return cells

    def cells(self) -> list[dict]:
        """Every configuration to train: the main task's cells, then the arms."""
        return self.main_cells() + [{TASK: arm} for arm in self.arms]

    def baseline_cell(self) -> dict:
        return self.main_cells()[0]

    def cell(self, key: str) -> dict:
        """The cell of a configuration key."""
        return next(cell for cell in self.cells() if config_key(cell) == key)

    def baseline_seeds(self) -> int:
        """The baseline's first-round replicates: about sqrt(k) times the others' (k: cells compared with it)."""
        k = max(1, len(self.main_cells()) - 1)
        return max(self.seeds, round(math.sqrt(k) * self.seeds))

    def first_round(self) -> list[tuple[dict, int]]:
        """(cell, replicates) of the first round."""
        cells = self.cells()
        return [(cells[0], self.baseline_seeds())] + [(cell, self.seeds) for cell in cells[1:]]

    def fixed(self) -> dict:
        """Baseline values that no question varies: plain overrides of the main task's trials."""
        return {key: value for key, value in self.baseline.items() if key not in self.vary}

    def expressions(self) -> dict[str, str]:
        """The search space the cells live in, in Hydra's grammar (for the study's distributions)."""
        space = {TASK: f"choice({','.join([self.main, *self.arms])})"}
        for key, levels in self.vary.items():
            space[key] = f"choice({','.join(str(v) for v in levels)})"
        return space

    def n_trials(self) -> int:
        return sum(count for _, count in self.first_round())

    def measured_arms(self) -> list[str]:
        """Arms reported on their own (another task), never compared: every arm but the epoch arms."""
        return [arm for arm in self.arms if arm not in self.epoch_arms]

    def own_data(self, arm: str) -> bool:
        """An arm that names its dataset keeps it: the main task's `dataset.*` overrides don't reach it."""
        return any(o.lstrip("+").partition("=")[0] == "dataset" for o in self.arms.get(arm, []))

    def question(self, key: str) -> Question:
        return self.questions[key]

    # --- stored on the study ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = asdict(self)
        out["questions"] = [asdict(q) for q in self.questions.values()]
        return out

    @classmethod
    def from_dict(cls, stored: dict) -> Design:
        """A design as the study stored it (older studies stored `arms` as a list of names and no questions)."""
        arms = stored.get("arms") or {}
        design = cls(seeds=int(stored.get("seeds", 2)), baseline=dict(stored["baseline"]), vary=dict(stored["vary"]),
                     main=str(stored["main"]), arms=arms if isinstance(arms, dict) else {a: [] for a in arms},
                     epochs=list(stored.get("epochs") or []), epoch_arms=dict(stored.get("epoch_arms") or {}),
                     curve_arm=stored.get("curve_arm"), base_epochs=int(stored.get("base_epochs") or 0),
                     replicates_per_model=int(stored.get("replicates_per_model") or 1))
        given = stored.get("questions") or []
        design.questions = _questions(design, {q["key"]: q for q in given} if isinstance(given, list) else given)
        return design


def _questions(design: Design, given: dict[str, dict]) -> dict[str, Question]:
    """Every question of the design, in order (factors, the curve, the arms), with what the sweep file says of it."""
    keys = [(key, FACTOR) for key in design.vary]
    if design.curve_arm or design.epoch_arms or EPOCHS in given:
        keys.append((EPOCHS, CURVE))
    keys += [(arm, ARM) for arm in design.measured_arms()]
    out = {}
    for key, kind in keys:
        spec = {k: v for k, v in (given.get(key) or {}).items() if k not in ("key", "kind")}
        out[key] = Question(key=key, kind=kind, number=str(spec.get("number", "")), label=str(spec.get("label", "")),
                            note=str(spec.get("note", "")), compare_at=tuple(spec.get("compare_at") or ()))
    return out


def load_design(raw: dict | None, anchor=lambda overrides: overrides) -> Design | None:
    """The `design:` block of a sweep YAML (a plain dict), checked; None when the sweep has none.

    Args:
        anchor: makes the arms' relative paths absolute (`config.anchor_paths` against the project).
    """
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"design={raw!r} must be a mapping (seeds, baseline, vary, main, epochs, arms, questions).")
    unknown = set(raw) - {"seeds", "baseline", "vary", "main", "arms", "epochs", "questions", "replicates_per_model"}
    if unknown:
        raise ConfigError(f"design: unknown key(s) {sorted(unknown)}; use seeds, baseline, vary, main, epochs, arms, "
                          "questions, replicates_per_model.")
    towers = raw.get("replicates_per_model", REPLICATES_PER_MODEL)
    if isinstance(towers, bool) or not isinstance(towers, int) or not 1 <= towers <= 16:
        raise ConfigError(f"design.replicates_per_model={towers!r} must be an integer from 1 to 16: the seeds of a "
                          "cell trained side by side as one model (1: one model at a time).")
    seeds, baseline, vary = raw.get("seeds", 3), raw.get("baseline") or {}, raw.get("vary") or {}
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ConfigError(f"design.seeds={seeds!r} must be an integer >= 2: one seed can't measure noise.")
    _check_vary(baseline, vary)
    epochs = raw.get("epochs") or []
    if not isinstance(epochs, list) or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                                               for m in epochs):
        raise ConfigError(f"design.epochs={epochs!r} must list whole multiples of train.epochs, e.g. [2, 4].")
    arms = {str(k): anchor([str(o) for o in v]) for k, v in (raw.get("arms") or {}).items()}
    main = str(raw.get("main", "main"))
    for name in [main, *arms]:
        if not name.replace("_", "").replace("-", "").isalnum() or name.startswith("epochs_x"):
            raise ConfigError(f"design: the task name {name!r} may hold letters, digits, '_' and '-' "
                              "(epochs_x* is reserved for the epochs arms).")
    design = Design(seeds=seeds, baseline=baseline, vary=vary, main=main, arms=arms, epochs=epochs,
                    replicates_per_model=towers)
    design.questions = _checked_questions(design, raw.get("questions") or {})
    return design


def _check_vary(baseline: dict, vary: dict) -> None:
    for key, levels in vary.items():
        if key not in baseline:
            raise ConfigError(f"design.vary.{key}: give its baseline value in design.baseline.{key}.")
        if not isinstance(levels, list) or len(levels) < 2 or baseline[key] not in levels:
            raise ConfigError(f"design.vary.{key}={levels!r} must list at least 2 values, the baseline "
                              f"({baseline[key]!r}) among them.")
        if len(set(map(str, levels))) != len(levels):
            raise ConfigError(f"design.vary.{key}={levels!r} lists a value twice.")


def _checked_questions(design: Design, given) -> dict[str, Question]:
    if not isinstance(given, dict):
        raise ConfigError(f"design.questions={given!r} must map a question (a varied key, train.epochs, an arm) to "
                          "{number, label, note, compare_at}.")
    known = {*design.vary, EPOCHS, *design.arms}
    for key, spec in given.items():
        if key not in known:
            raise ConfigError(f"design.questions.{key}: no such question; the design asks about {', '.join(known)}.")
        if not isinstance(spec, dict) or set(spec) - {"number", "label", "note", "compare_at"}:
            raise ConfigError(f"design.questions.{key}={spec!r} may hold number, label, note and compare_at.")
        axes = spec.get("compare_at") or []
        if not isinstance(axes, list) or set(axes) - set(AXES) or (axes and key not in design.vary):
            raise ConfigError(f"design.questions.{key}.compare_at={axes!r}: a varied key may list {', '.join(AXES)}.")
    return _questions(design, given)


def tables(records, design: Design, up_to_round: int | None = None):
    """The runs of a designed study, as its questions take them: (main task, measured arms, long curve).

    Only finished runs count (of rounds up to `up_to_round`); a run flagged as diverged or at chance
    level is `failed`. The long curve's runs, read at the baseline's epochs, are replicates of the
    baseline too (a constant learning rate makes epoch e of a longer run a run of e epochs), with
    seeds of their own.

    Args:
        records: `record.TrialRecord`s.
    """
    import pandas as pd

    done = [r for r in records if (r.complete or r.failed_outcome) and (up_to_round is None or r.round <= up_to_round)]
    rows, measured, curve = [], {}, []
    baseline = {f: design.baseline[f] for f in design.vary}
    for r in done:
        task = r.params.get(TASK)
        common = {"trial": r.number, "seed": r.seed, "failed": r.failed_outcome, "cell": config_key(r.params),
                  "test_accuracy": r.test_accuracy}
        if task == design.main:  # what a value is also compared at: its updates, training seconds, images seen
            rows.append({**{f: r.params.get(f) for f in design.vary}, **common, "objective": r.value,
                         "updates": r.updates, "seconds": sum(r.epoch_seconds) or None, "images": r.images_trained,
                         "correct": r.correct_at(r.epochs_run or 0)})
        elif task == design.curve_arm and r.complete:
            epochs = sorted(r.curve)
            steps = (r.updates or 0) / max(r.epochs_run or 1, 1)
            curve.append({**common, "curve": r.curve, "updates_scale": [steps * e for e in epochs],
                          "seconds_scale": [sum(r.epoch_seconds[:e]) for e in epochs] if r.epoch_seconds else [],
                          "images_scale": [(r.train_images or 0) * e for e in epochs]})
            at_base = r.value_at(design.base_epochs) if design.base_epochs else None
            if at_base is not None:
                rows.append({**baseline, **common, "cell": config_key({TASK: design.main, **baseline}),
                             "objective": at_base, "from_epochs_arm": True,
                             "correct": r.correct_at(design.base_epochs)})
        elif task in design.measured_arms():
            measured.setdefault(task, []).append(common)
    columns = [*design.vary, "trial", "seed", "failed", "cell", "test_accuracy", "objective", "updates",
               "seconds", "images", "correct"]
    main = (pd.DataFrame(rows).reindex(columns=[*columns, "from_epochs_arm"]) if rows
            else pd.DataFrame(columns=columns))
    return main, {arm: pd.DataFrame(runs) for arm, runs in measured.items()}, (
        pd.DataFrame(curve) if design.curve_arm else None)

"""The trial and study records: the one reader and writer of what cnnexp keeps in Optuna's attributes.

Optuna stores a trial's extra facts as string-keyed user attributes. Every key cnnexp uses is
written and read here, through `TrialRecord` (one trial) and `StudyRecord` (the study), like
keras-tuner's `Trial`; nothing else reads attribute strings. The study's own facts are typed values,
parsed here once: its `Design` (with its questions), its `Plan` (the rung), its `LookRecord`s (what
each look decided, which the report reads instead of deciding again). The sweep writes them, the
report reads them, and the benchmarks count what the records say was trained.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field, fields

import numpy as np
import optuna

from cnnexp.design import Design
from cnnexp.plan import Plan
from cnnexp.stats.settle import SETTLED, Look

# Optuna's own keys of a retried trial (RetryHeartbeatStaleTrialCallback) and of an enqueued one.
_RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback


@dataclass
class TrialRecord:
    """One trial: what it was, what it scored, what it cost, and how it ended."""

    number: int
    state: str                                  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    params: dict                                # the searched values (a design's `task` included)
    value: float | None = None                  # the objective (a multi-objective study: the first)
    values: list[float] | None = None           # every objective (multi-objective studies)
    curve: dict[int, float] = field(default_factory=dict)  # epoch (from 1) -> objective
    duration_s: float | None = None
    seed: int | None = None                     # the seed it trained with (a redraw gets the next unused one)
    repeat_of: int | None = None                # a repeat of that trial's configuration with another seed
    round: int = 1                              # a designed study's round of seeds (2, 3, ...: added to settle)
    train_limit: int | None = None              # the training images its subset was drawn to (the plan's rung)
    subset_seed: int | None = None              # which subset of that size (dataset.subset_seed)
    confirms: str | None = None                 # a higher-fidelity run that checks an effect at the next rung
    eval_correct: dict[str, str] | None = None  # epoch -> which evaluation images it got right (`pack`ed bits)
    trial_key: str | None = None                # names its checkpoint folder
    overrides: list[str] = field(default_factory=list)
    command: str = ""                           # the one-line command that reproduces it
    worker: str = ""
    mlflow_run_id: str | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    train_seconds: float | None = None
    images_per_second: float | None = None
    epochs_run: int | None = None
    epochs_trained_here: int | None = None      # a resumed trial trained only the epochs after its checkpoint
    resumed_from_epoch: int | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    step_seconds: float | None = None           # of those, in training steps (each epoch's validation taken out)
    train_images: int | None = None             # images one epoch trains on
    updates: int | None = None                  # optimizer steps over its training
    eval_images: int | None = None              # images the objective was measured on
    test_images: int | None = None              # images the test score was measured on
    num_classes: int | None = None
    predicted_s: float | None = None            # what the budget's planner predicted this trial would take
    num_params: int | None = None
    flops: int | None = None                    # forward FLOPs per image
    flag: str | None = None                     # diverged or at chance: a failed outcome, kept and reported
    dataset_note: str | None = None
    error: str | None = None
    pruned: str | None = None
    registered_version: str | None = None
    checkpoint_error: str | None = None
    retry_of: int | None = None                 # the lost trial this one resumes (Optuna's retry)
    towers: int | None = None                   # trained side by side with towers-1 other seeds of its cell

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def failed_outcome(self) -> bool:
        """A run whose training itself failed as an outcome of its settings: it diverged (complete and flagged,
        or stopped on a NaN loss) or ended at chance level. Not a crash, not a lost worker."""
        return (self.complete and bool(self.flag)) or (self.state == "FAIL" and (self.error or "").startswith(
            "NonFiniteLossError"))

    @property
    def images_trained(self) -> int:
        """Training images this trial went through (epochs x images per epoch), 0 when unknown."""
        return int((self.train_images or 0) * (self.epochs_run or 0))

    def cost(self, name: str) -> float | None:
        """A cost by its config name: model.num_params, model.flops_per_image or train_seconds."""
        return {"model.num_params": self.num_params, "model.flops_per_image": self.flops,
                "train_seconds": self.train_seconds}[name]

    def value_at(self, epoch: int) -> float | None:
        """The objective after `epoch` (from its learning curve)."""
        score = self.curve.get(epoch)
        return score if score is not None and math.isfinite(score) else None

    def correct_at(self, epoch: int) -> np.ndarray | None:
        """Which evaluation images it got right after `epoch` (None where that was not kept)."""
        packed = (self.eval_correct or {}).get(str(epoch))
        return unpack(packed, self.eval_images or 0) if packed and self.eval_images else None


def pack(correct: np.ndarray) -> str:
    """Right/wrong per image as base64 bits: 3,000 images in 500 characters of an Optuna attribute."""
    return base64.b64encode(np.packbits(np.asarray(correct, bool)).tobytes()).decode()


def unpack(packed: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(packed), np.uint8))[:n].astype(bool)


USER_KEYS = {f.name for f in fields(TrialRecord)} - {"number", "state", "params", "value", "curve", "duration_s",
                                                   "retry_of"}


def read_trial(frozen: optuna.trial.FrozenTrial) -> TrialRecord:
    """The record of a trial as Optuna holds it."""
    attrs = frozen.user_attrs
    return TrialRecord(
        number=frozen.number, state=frozen.state.name,
        params=dict(frozen.params) or dict(frozen.system_attrs.get("fixed_params", {})),
        value=frozen.values[0] if frozen.state == optuna.trial.TrialState.COMPLETE and frozen.values else None,
        values=list(frozen.values) if frozen.state == optuna.trial.TrialState.COMPLETE and frozen.values else None,
        curve={int(k): float(v) for k, v in frozen.intermediate_values.items()},
        # Seeds trained side by side share one wall: each trial's duration is its share, so that sums over trials
        # (the budget, the report's time lines) count the wall once.
        duration_s=round(frozen.duration.total_seconds() / max(1, int(attrs.get("towers") or 1)), 1)
        if frozen.duration else None,
        retry_of=_RETRY.retried_trial_number(frozen),
        **{key: attrs[key] for key in USER_KEYS if attrs.get(key) is not None},
    )


def read_trials(study: optuna.Study) -> list[TrialRecord]:
    return [read_trial(t) for t in study.get_trials(deepcopy=False)]


def write(trial: optuna.Trial, **values) -> None:
    """Set facts of a running trial (keys are `TrialRecord` fields); None clears a fact."""
    for key, value in values.items():
        if key not in USER_KEYS:
            raise KeyError(f"{key!r} is not a TrialRecord field")
        trial.set_user_attr(key, value)


def carried(frozen: optuna.trial.FrozenTrial) -> dict:
    """What a retry of a lost trial carries over (its key, seed, run, overrides), not its outcome."""
    drop = {"error", "pruned", "flag", "test_accuracy", "test_loss", "towers"}
    return {k: v for k, v in frozen.user_attrs.items() if k in USER_KEYS and k not in drop}


def retry_history(frozen: optuna.trial.FrozenTrial) -> list[int]:
    """Every earlier attempt of a trial that was retried (Optuna's own record)."""
    return list(_RETRY.retry_history(frozen))


def fixed_params(frozen: optuna.trial.FrozenTrial) -> dict | None:
    """The values an enqueued trial was given (a designed cell, a repeat), before it asks for them."""
    return frozen.system_attrs.get("fixed_params")


@dataclass
class LookRecord:
    """What one look decided: its share of the error rate, the answers at that rate, the time spent and left."""

    round: int
    alpha: float
    final: bool
    seconds_spent: float = 0.0
    seconds_left: float = 0.0
    calibration: float = 1.0
    undecided: list[str] = field(default_factory=list)
    look: Look | None = None                     # the answers (None in studies recorded before looks were kept)
    confirmations: dict | None = None            # the last look: each effect at the next rung (`stats.settle.confirm`)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "look"}
        return {**out, "look": self.look.to_dict() if self.look is not None else None}

    @classmethod
    def from_dict(cls, stored: dict) -> LookRecord:
        known = {f.name for f in fields(cls)} - {"look"}
        return cls(**{k: v for k, v in stored.items() if k in known},
                   look=Look.from_dict(stored["look"]) if stored.get("look") else None)


# The study's attributes and how each is read: plain values as stored, typed values parsed once.
STUDY_KEYS = ("uuid", "metric", "objectives", "constraints", "space", "design", "plan", "rounds", "answers", "champion",
              "mlflow_parent_run_id", "mlflow_tracking_uri", "mlflow_ui_url", "regime", "started_at")
_PARSE = {"design": Design.from_dict, "plan": Plan.from_dict,
          "rounds": lambda entries: [LookRecord.from_dict(e) for e in entries]}
_STORE = {"design": Design.to_dict, "plan": Plan.to_dict, "rounds": lambda entries: [e.to_dict() for e in entries]}


@dataclass
class StudyRecord:
    """A study's own facts: its search space or design, its plan, its looks, where its MLflow runs are."""

    name: str
    direction: str
    uuid: str | None = None
    metric: str | None = None                   # the objective (None until the first run stored it)
    space: dict | None = None                   # searched key -> its Hydra expression
    design: Design | None = None                # a designed study's cells, arms and questions
    plan: Plan | None = None                    # the budget's plan: the rung every trial trains on
    rounds: list[LookRecord] = field(default_factory=list)  # each look, as it was taken
    answers: dict | None = None                 # how answers are settled (answers.margin, alpha, looks)
    champion: dict | None = None                # a multi-objective study's registered champion (trial, version)
    objectives: list[str] = field(default_factory=list)        # a multi-objective study's metrics, in order
    constraints: list[list] = field(default_factory=list)      # [cost name, limit]: beyond it a trial is infeasible
    mlflow_parent_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_ui_url: str | None = None
    regime: dict | None = None                  # what makes its trials comparable: metric, direction, overrides
    started_at: float | None = None             # when it was first opened (epoch seconds): its wall counts from here

    def settled_at(self) -> dict[str, int]:
        """Question -> the first look whose answer settled it (its verdict holds at that look's error rate)."""
        out: dict[str, int] = {}
        for entry in self.rounds:
            if entry.look is not None:
                for question, verdict in entry.look.verdicts().items():
                    if verdict in SETTLED and question not in out:
                        out[question] = entry.round
        return out


def read_study(study: optuna.Study) -> StudyRecord:
    attrs = study.user_attrs
    return StudyRecord(name=study.study_name, direction=study.directions[0].name.lower(),
                       **{key: _PARSE.get(key, lambda v: v)(attrs[key]) for key in STUDY_KEYS
                          if attrs.get(key) is not None})


def write_study(study: optuna.Study, **values) -> None:
    for key, value in values.items():
        if key not in STUDY_KEYS:
            raise KeyError(f"{key!r} is not a StudyRecord field")
        study.set_user_attr(key, _STORE[key](value) if key in _STORE and value is not None else value)


def enqueue(study: optuna.Study, params: dict, **facts) -> None:
    """Queue a trial with fixed values (a designed cell, a repeat) and facts (keys are `TrialRecord` fields)."""
    unknown = set(facts) - USER_KEYS
    if unknown:
        raise KeyError(f"{sorted(unknown)} are not TrialRecord fields")
    study.enqueue_trial(params, user_attrs=facts or None)


def best_trial(study: optuna.Study, main_task: str | None = None) -> optuna.trial.FrozenTrial | None:
    """The best complete trial (of a design's main task: an arm scores another task; a confirmation trains on more
    data); None when none completed."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if (main_task is None or t.params.get("task") == main_task) and not t.user_attrs.get("confirms")]
    if not done:
        return None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return (max if maximize else min)(done, key=lambda t: t.values[0])

"""A sweep file's settings: their defaults, and the one check they all pass before any study exists.

Every value is checked here, once, so that a typo or a bad value is one line (`error: ...`, exit 2)
before anything is created, never a traceback after an hour of training.
"""

from __future__ import annotations

import re

from cnnexp import checks, stores
from cnnexp.errors import ConfigError

# What a sweep YAML may hold; `sweep.sampler` and `sweep.pruner` take extra keyword arguments.
DEFAULTS = {
    "sweep": {
        "study_name": None,         # default: the sweep file's name; it names folders, so letters, digits, . _ -
        "direction": "maximize",
        "metric": "val_accuracy",   # the test split is for the final score only
        "n_trials": 10,             # total for the study, across reruns and workers
        "timeout": None,            # seconds for this invocation
        "storage": "sqlite:///studies.db",
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
        "repeats": 0,               # re-train the best configurations with this many other seeds
        "repeat_top": 3,
        "log_models": "best",       # best | all | none
        "workers": 1,               # worker processes on this machine (more can join from others)
        "heartbeat_interval": 10,   # seconds; a trial silent for grace_period is failed as stale
        "grace_period": 60,
        "retry_failed": 1,          # re-run a lost worker's trial (from its last checkpoint) this many times
        "checkpoint_dir": None,     # per-trial checkpoints; default: <storage folder>/checkpoints/<study>
        # TensorFlow keeps ~20 MB per trained model that clear_session() does not return
        # (measured by `make bench`); the CLI restarts its process after this many trials (0: never).
        "recycle_after": 10,
        "estimate": True,           # print a time estimate before a sweep on a machine without GPU
        "output_dir": "outputs/sweeps",
        "system_metrics": True,     # CPU/memory/GPU of each trial in MLflow (system/ metrics)
        "budget": None,             # e.g. 45m or 2h: plan the data size and the seeds to fit, print the plan first
        # More objectives make a multi-objective study (accuracy against cost), e.g.
        # [{metric: train_seconds, direction: minimize}]; sweep.metric stays the first.
        "objectives": [],
        "constraints": [],          # e.g. ["model.num_params <= 1e6"]: trials beyond are infeasible (Optuna)
    },
    "answers": {
        "margin": 0.015,            # a question is settled when its CI lies within +-margin (or excludes 0)
        "alpha": 0.05,              # the error rate of each question, over all its looks
        "looks": 4,                 # the most times a designed study looks at its answers before it stops
        "confirm": True,            # re-run the effects found at the next rung of training images (2-4x)
    },
    "design": {},                   # controlled comparisons instead of an optimiser (cnnexp.design)
    "description": "",
    "overrides": [],
    "params": {},
}
RENAMED = {"answers.precision": "answers.margin"}  # old key -> new: refused with one line naming the new one
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler",
            "cmaes": "CmaEsSampler", "gp": "GPSampler", "nsga2": "NSGAIISampler"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner",
           "hyperband": "HyperbandPruner"}
METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")
COST_METRICS = ("train_seconds", "model.flops_per_image", "model.num_params")
CONSTRAINT = re.compile(r"\s*(model\.num_params|model\.flops_per_image|train_seconds)\s*<=\s*([0-9.eE+]+)\s*")


def constraint(text: str, key: str = "sweep.constraints") -> tuple[str, float]:
    """'model.num_params <= 1e6' -> ('model.num_params', 1000000.0)."""
    match = CONSTRAINT.fullmatch(str(text))
    if not match:
        raise ConfigError(f"{key}: {text!r} must read '<cost> <= <number>' with a cost among "
                          f"{', '.join(COST_METRICS)}.")
    return match[1], float(match[2])
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def study_name(value, key: str = "sweep.study_name") -> str:
    """A study name that is safe as a folder name (report, checkpoints) and a registered model name."""
    text = str(value)
    if not NAME.fullmatch(text) or ".." in text:
        raise ConfigError(f"{key}={text!r} may hold only letters, digits, '.', '_' and '-' (at most 100, no '..'): "
                          "it names the study's report and checkpoint folders and its registered model.")
    return text


def parse_budget(value) -> float | None:
    """'45m' -> 2700.0 seconds; None stays None."""
    if value in (None, "", "null"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value))
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"sweep.budget={value!r} must be a positive duration such as 45m, 2h or 900s.")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def validate_settings(settings, answers) -> None:
    """Check every `sweep.*` and `answers.*` value; each message names the key and the value."""

    def number(key, **rules):
        checks.number(settings.get(key), f"sweep.{key}", **rules)

    study_name(settings.study_name)
    checks.choice(settings.direction, "sweep.direction", ("maximize", "minimize"))
    checks.choice(settings.metric, "sweep.metric", METRICS)
    number("n_trials", integer=True, low=1)
    number("timeout", low=0, low_open=True, optional=True)
    number("repeats", integer=True, low=0)
    number("repeat_top", integer=True, low=1)
    number("workers", integer=True, low=1)
    number("heartbeat_interval", integer=True, low=1)
    number("grace_period", integer=True, low=int(settings.heartbeat_interval) + 1)
    number("retry_failed", integer=True, low=0)
    number("recycle_after", integer=True, low=0)
    checks.choice(settings.log_models, "sweep.log_models", ("best", "all", "none"))
    checks.flag(settings.estimate, "sweep.estimate")
    checks.flag(settings.system_metrics, "sweep.system_metrics")
    for key in ("storage", "output_dir"):
        if not isinstance(settings.get(key), str) or not settings.get(key):
            raise ConfigError(f"sweep.{key}={settings.get(key)!r} must be a non-empty path or URL.")
    stores.parse(settings.storage, "sweep.storage")
    if settings.get("checkpoint_dir") is not None and not isinstance(settings.checkpoint_dir, str):
        raise ConfigError(f"sweep.checkpoint_dir={settings.checkpoint_dir!r} must be a folder path.")
    parse_budget(settings.get("budget"))
    for i, extra in enumerate(settings.get("objectives") or []):
        checks.choice(extra.get("metric"), f"sweep.objectives.{i}.metric", (*METRICS, *COST_METRICS))
        checks.choice(extra.get("direction"), f"sweep.objectives.{i}.direction", ("maximize", "minimize"))
    for i, text in enumerate(settings.get("constraints") or []):
        constraint(text, f"sweep.constraints.{i}")
    checks.number(answers.get("margin"), "answers.margin", low=0, low_open=True, high=1)
    checks.number(answers.get("alpha"), "answers.alpha", low=0, low_open=True, high=0.5)
    checks.number(answers.get("looks"), "answers.looks", integer=True, low=1, high=20)
    checks.flag(answers.get("confirm"), "answers.confirm")
    check_options(settings.sampler, "sweep.sampler", "samplers", SAMPLERS, {"search_space", "constraints_func"})
    check_options(settings.pruner, "sweep.pruner", "pruners", PRUNERS, set())


def check_options(node, key: str, module: str, names: dict[str, str], ours: set[str]) -> None:
    """A sampler's or pruner's options against its class's own signature and annotations, and its own checks,
    before any storage or folder exists (a bad option would otherwise fail every trial)."""
    import inspect

    import optuna
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    name = options.pop("name", "tpe" if module == "samplers" else "none")
    checks.choice(name, f"{key}.name", names)
    cls = getattr(getattr(optuna, module), names[name])
    parameters = inspect.signature(cls).parameters
    for option, value in options.items():
        if option not in parameters or option in ours:
            close = ", ".join(p for p in parameters if p not in ours)
            raise ConfigError(f"{key}.{option}: {names[name]} takes no such option; it takes {close}.")
        _check_type(value, parameters[option].annotation, f"{key}.{option}")
    if name != "grid":  # the grid needs the search space: checked when the sampler is made
        try:
            cls(**options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def _check_type(value, annotation, key: str) -> None:
    """Plain annotations (int, float, bool, str, None and their unions) are checked; others are left to the class."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    allowed = {t.strip() for t in text.split("|")}
    plain = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None)}
    if not allowed or not allowed <= set(plain):
        return
    ok = any(isinstance(value, plain[t]) and not (isinstance(value, bool) and t in ("int", "float")) for t in allowed)
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {' or '.join(sorted(allowed))}.")


def answers_settings(stored: dict | None):
    """A study's `answers:` section as it stored it, with the defaults and the renamed keys' new names."""
    from omegaconf import OmegaConf

    given = {RENAMED.get(f"answers.{k}", f"answers.{k}").split(".", 1)[1]: v for k, v in (stored or {}).items()}
    return OmegaConf.create({**DEFAULTS["answers"], **given})


def objectives(settings) -> list[tuple[str, str]]:
    """(metric, direction) of every objective: `sweep.metric` first, then `sweep.objectives`."""
    return [(str(settings.metric), str(settings.direction)),
            *((str(o.metric), str(o.direction)) for o in settings.get("objectives") or [])]

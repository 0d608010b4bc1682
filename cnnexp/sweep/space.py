"""A sweep file: its settings, the overrides every trial shares, and its search space.

The search space is written in Hydra's own sweep grammar (`choice(3,5,7)`, `range(1,6)`,
`interval(0.001,0.1)`, `tag(log, interval(...))`) and turned into Optuna distributions once,
here; everything else (suggesting, the grid, estimates) reads those distributions.

Command-line overrides are sorted the Hydra way: `sweep.*` changes a setting, a sweep
expression adds or replaces a searched parameter, anything else is a fixed override.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnexp import PROJECT_ROOT, SWEEPS_DIR
from cnnexp.config import anchor_paths, compose_config
from cnnexp.errors import ConfigError
from cnnexp.sweep.design import TASK, Design, load_design

# What a sweep YAML may hold; `sweep.sampler` and `sweep.pruner` take extra keyword arguments.
DEFAULTS = {
    "sweep": {
        "study_name": None,         # default: the sweep file's name
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
        "checkpoint_dir": None,     # per-trial checkpoints; default: <storage folder>/checkpoints
        # TensorFlow keeps ~20 MB per trained model that clear_session() does not return
        # (measured by `make bench`); the CLI restarts its process after this many trials.
        "recycle_after": 10,
        "estimate": True,           # print a time estimate before a sweep on a machine without GPU
        "output_dir": "outputs/sweeps",
        "system_metrics": True,     # CPU/memory/GPU of each trial in MLflow (system/ metrics)
        "budget": None,             # e.g. 45m or 2h: choose the data size to fit, and print the plan first
    },
    "design": {},                   # controlled comparisons instead of an optimiser (cnnexp.design)
    "description": "",
    "overrides": [],
    "params": {},
}


@dataclass
class Sweep:
    """A loaded sweep: its settings, search space and the overrides every trial shares."""

    settings: DictConfig
    space: dict[str, optuna.distributions.BaseDistribution]   # override key -> distribution
    expressions: dict[str, str]          # override key -> the Hydra expression, for people
    overrides: list[str]                 # fixed overrides, shared by every trial
    base: DictConfig                     # the config every trial starts from (fixed overrides applied)
    add_keys: set[str] = field(default_factory=set)  # keys that need '+' (not in the config)
    path: Path | None = None
    design: Design | None = None         # a designed study: its cells are queued, not sampled


def sweep_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = SWEEPS_DIR / f"{name}.yaml"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
        raise ConfigError(f"No sweep {name!r} in {SWEEPS_DIR}; available: {available}.")
    return path


def load_sweep(name: str, cli_overrides: Sequence[str] = ()) -> Sweep:
    """Read `sweeps/<name>.yaml` (or a YAML path) and apply command-line overrides."""
    path = sweep_path(name)
    base = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(base, True)
    for node in (base.sweep.sampler, base.sweep.pruner, base.params, base.design):
        OmegaConf.set_struct(node, False)
    try:
        merged = OmegaConf.merge(base, OmegaConf.load(path))
    except Exception as err:  # noqa: BLE001 - OmegaConf's key errors name the key
        raise ConfigError(f"{path}: {err}") from err

    parser = OverridesParser.create()
    expressions = {str(k).lstrip("+"): str(v) for k, v in merged.params.items()}
    # Paths in a sweep file are relative to the project (../shared/data/...), whatever the working folder.
    fixed = anchor_paths(merged.overrides, PROJECT_ROOT)
    for text in cli_overrides:
        if text.startswith("sweep."):
            key, _, value = text.partition("=")
            try:
                OmegaConf.update(merged, key, yaml.safe_load(value) if value else None, merge=False)
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"Unknown sweep setting {key!r}: {err}") from err
            continue
        override = parser.parse_overrides([text])[0]
        if override.is_sweep_override():
            expressions[override.key_or_group.lstrip("+")] = text.partition("=")[2]
        else:
            fixed.append(text)
    design = load_design(merged.design)
    if design is not None:
        if expressions:
            raise ConfigError(f"{path}: a designed study takes its values from design.vary, not from params "
                              f"({', '.join(expressions)}); remove one of them.")
        expressions = design.expressions()
        merged.sweep.n_trials = design.n_trials()
    if not expressions:
        raise ConfigError(f"{path} searches nothing: add params (e.g. kernel: choice(3,5,7)).")
    space = {key: distribution(key, expression, parser) for key, expression in expressions.items()}

    settings = merged.sweep
    settings.study_name = settings.study_name or path.stem
    base_cfg = compose_config(fixed)
    if design is not None and design.fixed():  # e.g. the baseline's width when no question varies it
        fixed += [f"{'' if OmegaConf.select(base_cfg, k, default='__absent__') != '__absent__' else '+'}{k}={v}"
                  for k, v in design.fixed().items()]
        base_cfg = compose_config(fixed)
    # Which searched keys need '+': those the composed config does not have (the shortcuts).
    keys = set(space) | set(design.baseline if design else {})
    add_keys = {key for key in keys if OmegaConf.select(base_cfg, key, default="__absent__") == "__absent__"}
    return Sweep(settings=settings, space=space, expressions=expressions, overrides=fixed, base=base_cfg,
                 add_keys=add_keys - {TASK}, path=path, design=design)


def distribution(key: str, expression: str, parser=None) -> optuna.distributions.BaseDistribution:
    """One Hydra sweep expression as an Optuna distribution."""
    parser = parser or OverridesParser.create()
    parsed = parser.parse_overrides([f"{key}={expression}"])[0]
    if not parsed.is_sweep_override():
        raise ConfigError(f"params.{key}: {expression!r} is not a sweep expression such as choice(...).")
    sweep = parsed.value()
    dists = optuna.distributions
    if isinstance(sweep, ChoiceSweep):
        return dists.CategoricalDistribution([_choice_token(v) for v in sweep.list])
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if all(isinstance(v, int) for v in (start, stop, step)):
            return dists.IntDistribution(start, start + step * ((stop - 1 - start) // step), step=step)
        count = int((stop - start) / step - 1e-9) + 1
        return dists.FloatDistribution(start, start + step * (count - 1), step=step)
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if "int" in sweep.tags or (isinstance(sweep.start, int) and isinstance(sweep.end, int) and not log_scale):
            return dists.IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return dists.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ConfigError(f"params.{key}: {type(sweep).__name__} is not supported; use choice, range or interval.")


def _choice_token(value):
    """Optuna's categorical values must be scalars: lists become their override text."""
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return value


def values_of(dist: optuna.distributions.BaseDistribution) -> list | None:
    """Every value of a discrete distribution (None for a continuous one)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, optuna.distributions.FloatDistribution) and dist.step:
        count = round((dist.high - dist.low) / dist.step) + 1
        return [round(dist.low + i * dist.step, 12) for i in range(count)]
    return None


def grid_of(space: dict) -> dict[str, list]:
    grid = {}
    for key, dist in space.items():
        values = values_of(dist)
        if values is None:
            raise ConfigError(f"sweep.sampler.name=grid needs choice(...) or range(...); params.{key} is an interval.")
        grid[key] = values
    return grid


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """Ask Optuna for one value per searched key."""
    values = {}
    for key, dist in space.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            values[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return values


def trial_overrides(sweep: Sweep, values: dict) -> list[str]:
    """Every override of one trial: the fixed ones, then the trial's values (a design's `task`: its arm's).

    The rule for data: an arm of a design that names its own dataset (`dataset=mnist`) gets none
    of the main task's `dataset.*` overrides, wherever they came from (the sweep file, the command
    line, the budget's plan); an arm that doesn't name one trains on the main task's data.
    """
    arm = values.get(TASK)
    arm_overrides = list(sweep.design.arms[arm]) if sweep.design is not None and arm in sweep.design.arms else []
    fixed = sweep.overrides
    if any(_key(o) == "dataset" for o in arm_overrides):
        fixed = [o for o in fixed if _key(o) != "dataset" and not _key(o).startswith("dataset.")]
    searched = [f"{'+' if key in sweep.add_keys else ''}{key}={value}" for key, value in values.items() if key != TASK]
    return [*fixed, *searched, *arm_overrides]


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")

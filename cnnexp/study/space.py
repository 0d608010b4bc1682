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

from cnnexp import PROJECT_ROOT, SWEEPS_DIR, checks
from cnnexp.config import anchor_paths, check_keys, check_overrides, compose_config, effective_overrides
from cnnexp.design import TASK, Design, load_design
from cnnexp.errors import ConfigError
from cnnexp.model.layers import layers_from_config
from cnnexp.model.shapes import validate_architecture
from cnnexp.study.settings import DEFAULTS, RENAMED, validate_settings
from cnnexp.train.options import is_constant_schedule


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
    answers: DictConfig | None = None    # what settles an answer (answers.margin, alpha, looks, confirm)

    def regime(self) -> dict:
        """What a trial measures, stored with the study: a rerun that differs would mix regimes in one report.

        The metric and direction, the main task's epochs, and every fixed override but those that only say
        where things are or how much is printed (paths, caches, tracking, verbosity).
        """
        where = ("dataset.path", "dataset.cache_dir", "dataset.download", "tracking", "train.verbose", "output_dir")
        kept = {_key(o): o.partition("=")[2] for o in effective_overrides(self.overrides)
                if not _key(o).startswith(where)}
        return {"metric": str(self.settings.metric), "direction": str(self.settings.direction),
                "epochs": int(self.base.train.epochs), "overrides": kept,
                "objectives": [str(o.metric) for o in self.settings.get("objectives") or []]}

    def data_key(self, key: str):
        """A `dataset.*` value the study's trials share (the sweep's overrides, the command line), or None."""
        return OmegaConf.select(self.base, key, default=None)


def sweep_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = SWEEPS_DIR / f"{name}.yaml"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
        raise ConfigError(f"No sweep {name!r} in {SWEEPS_DIR}; available: {available}.")
    return path


def _read(path: Path) -> DictConfig:
    """The sweep file over the defaults; each section of the right type (a mapping, a list of overrides, a string)."""
    base = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(base, True)
    for node in (base.sweep.sampler, base.sweep.pruner, base.params, base.design):
        OmegaConf.set_struct(node, False)
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # plain YAML: no tags, no code
        why = None if isinstance(loaded, dict) else f"it holds a {type(loaded).__name__}"
    except Exception as err:  # noqa: BLE001 - YAML's errors (with the line), a scalar, an unreadable file
        why = " ".join(str(err).split())[:300]
    if why:
        raise ConfigError(f"{path} is not a sweep file ({why}): it must be a YAML mapping of sections (sweep:, "
                          "params: or design:, overrides:, answers:, description:).")
    loaded = {key: value for key, value in loaded.items() if value is not None}  # `params:` left empty
    for key in loaded:
        if key not in DEFAULTS:
            raise ConfigError(f"{path}: unknown section {key!r}; a sweep file holds {', '.join(DEFAULTS)}.")
    for section in ("sweep", "answers", "design", "params"):
        checks.mapping(loaded.get(section, {}), f"{path}: {section}", "a mapping of keys to values")
    settings, design = loaded.get("sweep", {}), loaded.get("design", {})
    nested = [(settings, key, dict, False) for key in ("sampler", "pruner")]  # null is no sampler either
    nested += [(settings, key, list, True) for key in ("objectives", "constraints")]
    nested += [(design, key, dict, True) for key in ("baseline", "vary", "arms")]
    for node, key, kind, nullable in nested:
        value = node.get(key)
        if key in node and not isinstance(value, kind) and not (nullable and value is None):
            what = "a mapping" if kind is dict else "a list"
            raise ConfigError(f"{path}: {'sweep' if node is settings else 'design'}.{key}={value!r} must be {what}.")
    for arm, overrides in (design.get("arms") or {}).items():
        checks.overrides(overrides, f"{path}: design.arms.{arm}")
    checks.overrides(loaded.get("overrides", []), f"{path}: overrides")
    checks.text(loaded.get("description", ""), f"{path}: description")
    _renamed(loaded, path)
    try:
        return OmegaConf.merge(base, loaded)
    except Exception as err:  # noqa: BLE001 - OmegaConf's errors name the key
        key = getattr(err, "full_key", None)
        why = f"unknown setting {key!r}" if key and "not in struct" in str(err) else str(err).splitlines()[0]
        raise ConfigError(f"{path}: {why}") from None


def _renamed(node, where) -> None:
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(node.get(section), dict) and key in node[section]:
            raise ConfigError(f"{where}: {old} is now {new} (the same number: the half-width a CI must fit within); "
                              f"rename it.")


def _apply_cli(merged: DictConfig, cli_overrides: Sequence[str], parser) -> tuple[dict[str, str], list[str]]:
    """Sort command-line overrides: settings, searched parameters, fixed overrides (in that order of checks)."""
    expressions, fixed = {}, []
    for text in cli_overrides:
        key, _, value = text.partition("=")
        if key in RENAMED:
            raise ConfigError(f"{key} is now {RENAMED[key]} (the same number: the half-width a CI must fit within); "
                              f"write {RENAMED[key]}={value}.")
        if key.startswith(("sweep.", "answers.", "design.")):
            try:
                OmegaConf.update(merged, key, yaml.safe_load(value) if value else None, merge=False)
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"Unknown setting {key!r} ({str(err).splitlines()[0]}); see sweeps/README or "
                                  "`python -m cnnexp.sweep --help`.") from err
            continue
        try:
            override = parser.parse_overrides([text])[0]
        except Exception as err:  # noqa: BLE001 - Hydra's grammar errors
            raise ConfigError(f"command-line override {text!r} is not valid Hydra syntax "
                              f"({str(err).splitlines()[0]}).") from err
        if override.is_sweep_override():
            expressions[override.key_or_group.lstrip("+")] = value
        else:
            fixed.append(text)
    return expressions, fixed


def load_sweep(name: str, cli_overrides: Sequence[str] = ()) -> Sweep:
    """Read `sweeps/<name>.yaml` (or a YAML path), apply command-line overrides, and check everything.

    Every check a sweep can fail happens here, before any study exists: the settings, the search
    expressions, and that every trial's config composes (a typo in a searched key, a bad value).
    """
    path = sweep_path(name)
    merged = _read(path)
    _refuse_hydra(merged, path, cli_overrides)
    parser = OverridesParser.create()
    expressions = {str(k).lstrip("+"): str(v) for k, v in merged.params.items()}
    # Paths in a sweep file are relative to the project (../shared/data/...), whatever the working folder.
    fixed = anchor_paths(merged.overrides, PROJECT_ROOT)
    cli_expressions, cli_fixed = _apply_cli(merged, cli_overrides, parser)
    expressions.update(cli_expressions)
    fixed += cli_fixed
    settings = merged.sweep
    settings.study_name = settings.study_name or path.stem
    validate_settings(settings, merged.answers)
    design = load_design(OmegaConf.to_container(merged.design, resolve=True),
                         anchor=lambda overrides: anchor_paths(overrides, PROJECT_ROOT))
    if design is not None and expressions:
        raise ConfigError(f"{path}: a designed study takes its values from design.vary, not from params "
                          f"({', '.join(expressions)}); remove one of them.")
    base_cfg = compose_config(fixed)
    if design is not None:
        fixed, base_cfg = _with_baseline(design, fixed, base_cfg)
        expressions = design.expressions()
        settings.n_trials = design.n_trials()
    if not expressions:
        raise ConfigError(f"{path} searches nothing: add params (e.g. kernel: choice(3,5,7)).")
    space = {key: distribution(key, expression, parser) for key, expression in expressions.items()}
    # Which searched keys need '+': those the composed config does not have (the shortcuts).
    keys = set(space) | set(design.baseline if design else {})
    add_keys = {key for key in keys if OmegaConf.select(base_cfg, key, default="__absent__") == "__absent__"} - {TASK}
    sweep = Sweep(settings=settings, space=space, expressions=expressions, overrides=fixed, base=base_cfg,
                  add_keys=add_keys, path=path, design=design, answers=merged.answers)
    check_trials(sweep)
    return sweep


def _refuse_hydra(merged: DictConfig, path: Path, cli_overrides: Sequence[str]) -> None:
    """No hydra.* key from the file or the command line reaches Hydra (they can make it import code)."""
    check_overrides([str(o) for o in merged.overrides], f"{path}: overrides:")
    check_keys([*merged.params, *(merged.design.get("baseline") or {}), *(merged.design.get("vary") or {})],
               f"{path}: the key")
    for arm, overrides in (merged.design.get("arms") or {}).items():
        check_overrides([str(o) for o in overrides], f"{path}: design.arms.{arm}:")
    check_overrides([o for o in cli_overrides if not o.startswith(("sweep.", "answers.", "design."))],
                    "command-line override")


def _with_baseline(design: Design, fixed: list[str], base_cfg: DictConfig) -> tuple[list[str], DictConfig]:
    """Add the baseline values no question varies (plain overrides) and the epochs arms; re-compose."""
    def has(key):
        return OmegaConf.select(base_cfg, key, default="__absent__") != "__absent__"

    if design.fixed():  # e.g. the baseline's width when no question varies it
        fixed = fixed + [f"{'' if has(k) else '+'}{k}={v}" for k, v in design.fixed().items()]
        base_cfg = compose_config(fixed)
    design.add_epoch_arms(int(base_cfg.train.epochs), is_constant_schedule(base_cfg.train),
                          {k for k in design.baseline if not has(k)})
    return fixed, base_cfg


def probes(sweep: Sweep) -> list[dict]:
    """Trial values that together touch every searched value: a design's cells, or each value of each key."""
    if sweep.design is not None:
        return sweep.design.cells()
    ends = {key: values_of(dist) or [dist.low, dist.high] for key, dist in sweep.space.items()}
    first = {key: values[0] for key, values in ends.items()}
    return [first] + [{**first, key: value} for key, values in ends.items() for value in values[1:]]


def check_trials(sweep: Sweep) -> None:
    """Compose (and validate) the config of every probe trial: a bad key or value fails now, in one line."""
    for values in probes(sweep):
        what = ", ".join(f"{k}={v}" for k, v in values.items())
        try:
            cfg = compose_config(trial_overrides(sweep, values))
            validate_architecture(layers_from_config(cfg), cfg.dataset.input_shape, cfg.dataset.num_classes,
                                  cfg.model.padding)
        except ConfigError as err:
            raise ConfigError(f"the trial {what} can't run: {err}") from None
        except Exception as err:  # noqa: BLE001 - Hydra's own errors (an unknown group option, a bad type)
            raise ConfigError(f"the trial {what} can't run: {str(err).splitlines()[0]}") from None


def distribution(key: str, expression: str, parser=None) -> optuna.distributions.BaseDistribution:
    """One Hydra sweep expression as an Optuna distribution; a bad one is one line naming the key."""
    where = f"params.{key}={expression!r}"
    try:
        parsed = (parser or OverridesParser.create()).parse_overrides([f"{key}={expression}"])[0]
        sweep = parsed.value()
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors
        raise ConfigError(f"{where} is not a valid sweep expression ({str(err).splitlines()[0]}); "
                          "use choice(a,b,...), range(start,stop[,step]) or interval(low,high).") from err
    if not parsed.is_sweep_override():
        raise ConfigError(f"{where} is not a sweep expression such as choice(...).")
    try:
        return _distribution(sweep, where)
    except ValueError as err:  # Optuna's own range checks
        raise ConfigError(f"{where}: {err}") from err


def _distribution(sweep, where: str) -> optuna.distributions.BaseDistribution:
    dists = optuna.distributions
    if isinstance(sweep, ChoiceSweep):
        if not sweep.list:
            raise ConfigError(f"{where} lists no value.")
        return dists.CategoricalDistribution([_choice_token(v) for v in sweep.list])
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if not step or (stop - start) / step <= 0:
            raise ConfigError(f"{where} is empty: range(start, stop, step) needs start < stop and a positive step.")
        if all(isinstance(v, int) for v in (start, stop, step)):
            return dists.IntDistribution(start, start + step * ((stop - 1 - start) // step), step=step)
        count = int((stop - start) / step - 1e-9) + 1
        return dists.FloatDistribution(start, start + step * (count - 1), step=step)
    if isinstance(sweep, IntervalSweep):
        if not sweep.start < sweep.end:
            raise ConfigError(f"{where} is empty: interval(low, high) needs low < high.")
        log_scale = "log" in sweep.tags
        if log_scale and sweep.start <= 0:
            raise ConfigError(f"{where}: a log interval needs low > 0.")
        if "int" in sweep.tags:
            return dists.IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return dists.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ConfigError(f"{where}: {type(sweep).__name__} is not supported; use choice, range or interval.")


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


def trial_overrides(sweep: Sweep, values: dict, data: Sequence[str] = ()) -> list[str]:
    """Every override of one trial: the fixed ones, its data, then the trial's values (a design's `task`: its arm's).

    Args:
        data: the main task's data for this trial, from the study's plan and the trial's record (its
            rung `dataset.train_limit`, its `dataset.subset_seed`).

    The rule for data: an arm of a design that names its own dataset (`dataset=mnist`) gets none
    of the main task's `dataset.*` overrides, wherever they came from (the sweep file, the command
    line, the plan); an arm that doesn't name one trains on the main task's data.
    """
    arm = values.get(TASK)
    arm_overrides = list(sweep.design.arms[arm]) if sweep.design is not None and arm in sweep.design.arms else []
    fixed = [*sweep.overrides, *data]
    if sweep.design is not None and sweep.design.own_data(arm):
        fixed = [o for o in fixed if _key(o) != "dataset" and not _key(o).startswith("dataset.")]
    searched = [f"{'+' if key in sweep.add_keys else ''}{key}={value}" for key, value in values.items() if key != TASK]
    return [*fixed, *searched, *arm_overrides]


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")

"""Compose and validate experiment configs (Hydra's compose API; no `_target_` anywhere)."""

from __future__ import annotations

import difflib
import math
import shlex
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cnnexp import CONF_DIR
from cnnexp.errors import ConfigError

# Command-line knobs that are deliberately not keys of the primary config, so that the
# spelling `+kernel=7` works (Hydra refuses '+' for a key that already exists).
SHORTCUTS = {
    "kernel": "kernel size of every conv layer",
    "filters": "filters of every conv layer (one value, or a list with one per conv layer)",
    "width": "multiplier on every conv layer's filters",
}


def compose_config(overrides: Iterable[str] = (), config_name: str = "config") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides and validate it.

    Args:
        overrides: Hydra override strings, e.g. ["+kernel=7", "train.epochs=1"].
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=effective_overrides(overrides))
    validate_config(cfg)
    return cfg


@cache
def known_keys() -> dict[str, set[str]]:
    """Every key a section may hold: the union over that group's YAML files (nested as 'a.b')."""
    known: dict[str, set[str]] = {}
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        keys: set[str] = set()
        for file in group_dir.glob("*.yaml"):
            keys |= _dotted_keys(yaml.safe_load(file.read_text()) or {})
        known[group_dir.name] = keys
    primary = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    known[""] = (set(primary) - {"defaults", "hydra"}) | set(known) | set(SHORTCUTS)
    return known


def _dotted_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def validate_config(cfg: DictConfig) -> None:
    """Reject unknown keys (a typo such as `+kernal=7`) and bad training values, before any work."""
    known = known_keys()
    for key in cfg:
        if key not in known[""]:
            _unknown(key, known[""], extra="" if key in known else
                     "  Shortcuts: " + "; ".join(f"+{k}: {v}" for k, v in SHORTCUTS.items()))
    for section in ("dataset", "model", "train", "tracking"):
        if not isinstance(cfg.get(section), DictConfig):
            raise ConfigError(f"The config has no '{section}' section; pick one with {section}=<name>.")
        present = _dotted_keys(OmegaConf.to_container(cfg[section], resolve=False))
        for key in sorted(present - known[section]):
            if "." not in key or key.rsplit(".", 1)[0] in known[section]:
                _unknown(f"{section}.{key}", {f"{section}.{k}" for k in known[section]})
    validate_train_config(cfg.train)


def _unknown(key: str, choices: set[str], extra: str = "") -> None:
    close = difflib.get_close_matches(key, sorted(choices), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"Unknown config key '{key}'.{hint}{extra}")


def anchor_paths(overrides: Iterable[str], root: Path) -> list[str]:
    """Relative paths in overrides written in a file, made absolute against that file's project root."""
    out = []
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and _is_path_key(key) and value and not _is_absolute(value):
            value = str((root / value).resolve())
        out.append(f"{key}{sep}{value}")
    return out


def _is_path_key(key: str) -> bool:
    return key.lstrip("+").endswith(("path", "cache_dir", "artifact_root"))


def _is_absolute(value: str) -> bool:
    return "://" in value or value.startswith(("/", "$", "~", "null"))


def effective_overrides(overrides: Iterable[str]) -> list[str]:
    """Overrides with later ones replacing earlier ones for the same key, and paths made absolute.

    `dataset.train_limit=8000 ... dataset.train_limit=2000` becomes one `dataset.train_limit=2000`,
    so that a reproduce command says what ran and works from any folder.
    """
    by_key: dict[str, str] = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and _is_path_key(key) and value and not _is_absolute(value):
            value = str(Path(value).resolve())
        by_key.pop(key.lstrip("+"), None)  # keep the last one, in its place
        by_key[key.lstrip("+")] = f"{key}{sep}{value}"
    return list(by_key.values())


def overrides_to_command(overrides: Iterable[str], module: str = "cnnexp.run") -> str:
    """The one-line command that reproduces a run with these overrides."""
    return " ".join(["python", "-m", module, *(shlex.quote(o) for o in effective_overrides(overrides))])


# --------------------------------------------------------------------------------------------
# The `train` section: values checked once, here, so that nothing trains on a bad value.

OPTIMIZERS = {  # train.optimizer -> (Keras class, default learning rate, default momentum)
    "sgd": ("SGD", 0.01, 0.9), "adam": ("Adam", 3e-4, None), "adamw": ("AdamW", 3e-4, None),
    "rmsprop": ("RMSprop", 1e-3, 0.0), "nadam": ("Nadam", 3e-4, None), "adagrad": ("Adagrad", 0.01, None),
}
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def optimizer_settings(train_cfg) -> tuple[str, float, float | None]:
    """(Keras class, learning rate, momentum): `train.lr: null` takes the optimizer's own default.

    SGD's 0.01 is far too high for Adam (its loss blew up to ~1500 on CIFAR-10), so a learning
    rate is only inherited when the user set one.
    """
    name, default_lr, default_momentum = OPTIMIZERS[train_cfg.optimizer]
    lr = default_lr if train_cfg.get("lr") is None else float(train_cfg.lr)
    momentum = None if default_momentum is None else (
        default_momentum if train_cfg.get("momentum") is None else float(train_cfg.momentum))
    return name, lr, momentum


def validate_train_config(train_cfg) -> None:
    """Check types and ranges of the `train` section; every message names the key to fix."""

    def number(key, *, integer=False, low=None, low_open=False, high=None, high_open=False, optional=False):
        value = train_cfg.get(key)
        if optional and value is None:
            return
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"train.{key}={value!r} must be {kind}.")
        if not math.isfinite(value):
            raise ConfigError(f"train.{key}={value!r} must be a finite number.")
        if low is not None and (value <= low if low_open else value < low):
            raise ConfigError(f"train.{key}={value!r} must be {'>' if low_open else '>='} {low}.")
        if high is not None and (value >= high if high_open else value > high):
            raise ConfigError(f"train.{key}={value!r} must be {'<' if high_open else '<='} {high}.")

    if train_cfg.get("optimizer") not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={train_cfg.get('optimizer')!r} is unknown; use one of {', '.join(OPTIMIZERS)}."
        )
    number("lr", low=0, low_open=True, optional=True)
    number("momentum", low=0, high=1, high_open=True, optional=True)
    number("batch_size", integer=True, low=1)
    number("epochs", integer=True, low=1)
    number("val_fraction", low=0, low_open=True, high=1, high_open=True)
    number("seed", integer=True, low=0)
    number("verbose", integer=True, low=0, high=2)
    if train_cfg.get("precision") not in PRECISIONS:
        raise ConfigError(f"train.precision={train_cfg.get('precision')!r} must be one of {', '.join(PRECISIONS)}.")
    if train_cfg.get("jit_compile") not in ("auto", True, False):
        raise ConfigError(f"train.jit_compile={train_cfg.get('jit_compile')!r} must be auto, true or false.")
    if train_cfg.get("steps_per_execution") != "auto":
        number("steps_per_execution", integer=True, low=1)
    if train_cfg.get("pipeline") not in ("tf_data", "numpy"):
        raise ConfigError(f"train.pipeline={train_cfg.get('pipeline')!r} must be tf_data or numpy.")
    if train_cfg.get("images_per_epoch") is not None:
        number("images_per_epoch", integer=True, low=int(train_cfg.batch_size))
        if train_cfg.pipeline != "tf_data":
            raise ConfigError("train.images_per_epoch needs train.pipeline=tf_data (an endless, reshuffled stream).")
    stopping = train_cfg.early_stopping
    if stopping.enabled:
        if stopping.monitor not in ("val_loss", "val_accuracy", "loss", "accuracy"):
            raise ConfigError(f"train.early_stopping.monitor={stopping.monitor!r} is not a Keras metric name.")
        if not isinstance(stopping.patience, int) or stopping.patience < 0:
            raise ConfigError(f"train.early_stopping.patience={stopping.patience!r} must be an integer >= 0.")

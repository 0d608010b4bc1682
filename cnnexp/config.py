"""Compose and validate experiment configs (Hydra's compose API; no `_target_` anywhere)."""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cnnexp import CONF_DIR, checks
from cnnexp.data.raw import smallest_limit
from cnnexp.errors import ConfigError
from cnnexp.train.options import validate_train_config

# Command-line knobs that are deliberately not keys of the primary config, so that the
# spelling `+kernel=7` works (Hydra refuses '+' for a key that already exists).
SHORTCUTS = {
    "kernel": "kernel size of every conv layer",
    "filters": "filters of every conv layer (one value, or a list with one per conv layer)",
    "width": "multiplier on every conv layer's filters",
    "batchnorm": "false drops every batch normalisation layer (true keeps them)",
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
    validate_dataset_limits(cfg.dataset, float(cfg.train.val_fraction))


def validate_dataset_limits(dataset_cfg, val_fraction: float) -> None:
    """Subset sizes: whole numbers, and (when the class count is known) enough for every class to train and validate."""
    for key in ("train_limit", "test_limit", "eval_limit"):
        checks.number(dataset_cfg.get(key), f"dataset.{key}", integer=True, low=1, optional=True)
    classes, limit = dataset_cfg.get("num_classes"), dataset_cfg.get("train_limit")
    if classes and limit is not None:
        smallest = smallest_limit(int(classes), val_fraction, dataset_cfg.get("eval_limit") is not None)
        if limit < smallest:
            raise ConfigError(f"dataset.train_limit={limit} can't give each of the {classes} classes a training image"
                              + ("" if dataset_cfg.get("eval_limit") is not None else
                                 f" and a validation image (train.val_fraction={val_fraction})")
                              + f": the smallest dataset.train_limit that works is {smallest}.")


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

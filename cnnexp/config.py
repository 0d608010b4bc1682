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
from cnnexp.data.options import validate_dataset_config
from cnnexp.errors import ConfigError
from cnnexp.train.options import validate_augment_size, validate_train_config

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

    Every override is checked before Hydra sees it (`check_overrides`); Hydra's own errors (an
    unknown group option, a key that needs '+') become one ConfigError line.

    Args:
        overrides: Hydra override strings, e.g. ["+kernel=7", "train.epochs=1"].
    """
    overrides = effective_overrides(check_overrides(list(overrides)))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's and OmegaConf's errors: one line, with a hint
        raise ConfigError(_hydra_error(err, overrides)) from None
    validate_config(cfg)
    return cfg


def check_overrides(overrides: list[str], where: str = "override") -> list[str]:
    """Refuse what would let an override load code, before Hydra composes anything.

    `hydra.searchpath=[pkg://x]` makes Hydra import the Python package x (from the working folder,
    which `python -m` puts first on sys.path); `hydra/...` picks launchers and plugins; an
    `@package` override can write into the `hydra` node. cnnexp sets Hydra's own settings itself.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        try:
            parsed = parser.parse_overrides([text])[0]
        except Exception as err:  # noqa: BLE001 - Hydra's grammar errors
            raise ConfigError(f"{where} {text!r} is not valid Hydra syntax ({str(err).splitlines()[0]}).") from None
        if _loads_code(parsed.key_or_group) or parsed.package is not None:
            raise ConfigError(f"{where} {text!r} is refused: {REFUSED}")
    return overrides


REFUSED = ("hydra.* keys and @package overrides change where Hydra loads configs and code from (hydra.searchpath "
           "imports Python packages); cnnexp sets Hydra's own settings itself.")


def check_keys(keys: Iterable[str], where: str) -> None:
    """The same refusal for keys a sweep file searches or fixes (`params:`, `design.baseline`)."""
    for key in keys:
        if _loads_code(str(key).lstrip("+~")) or "@" in str(key):
            raise ConfigError(f"{where} {str(key)!r} is refused: {REFUSED}")


def _loads_code(key: str) -> bool:
    return key.replace("/", ".").split(".")[0] == "hydra"


def _hydra_error(err: Exception, overrides: list[str]) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if "Available options" in " ".join(lines):  # `dataset=nosuch`: name the options, not Hydra's search path
        at = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = [line for line in lines[at + 1:] if not line.startswith(("Config search path", "provider="))]
        return f"{first}; {lines[at].rstrip(':').lower()}: {', '.join(options)}."
    for text in overrides:
        key = text.partition("=")[0]
        if key in SHORTCUTS:  # `kernel=7`: the shortcuts are not config keys, so Hydra needs '+'
            return f"{key} is a shortcut, not a config key: write +{text} ({first})"
        if key.startswith("+") and not key.startswith("++") and f"'{key[1:]}'" in first:
            # `+tracking.timeout=5`: '+' adds a key the config lacks; this one is there already
            return f"{key[1:]} is a config key already: write {text[1:]} without '+' ({first})"
    return first


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
    validate_dataset_config(cfg.dataset, float(cfg.train.val_fraction))
    validate_augment_size(cfg.train.augment, cfg.dataset.input_shape)  # a shift must fit the images
    validate_tracking_config(cfg.tracking)


def validate_tracking_config(tracking_cfg) -> None:
    """The `tracking` section: MLflow's store, experiment, and what is logged."""
    checks.flag(tracking_cfg.get("enabled"), "tracking.enabled")
    checks.text(tracking_cfg.get("uri"), "tracking.uri", optional=not tracking_cfg.get("enabled"))
    checks.text(tracking_cfg.get("artifact_root"), "tracking.artifact_root", optional=True)
    if not checks.text(tracking_cfg.get("experiment"), "tracking.experiment"):
        raise ConfigError("tracking.experiment='' must name an MLflow experiment, e.g. cnnexp.")
    checks.flag(tracking_cfg.get("log_model"), "tracking.log_model")
    checks.number(tracking_cfg.get("timeout"), "tracking.timeout", low=0, low_open=True, high=3600)
    checks.flag(tracking_cfg.get("telemetry"), "tracking.telemetry")


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
    return key.lstrip("+").startswith(("dataset.", "tracking.", "sweep.")) and key.endswith(
        ("path", "cache_dir", "artifact_root"))


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

"""Value checks shared by every config section, sweep setting and layer field: one place, one wording.

Every message names the key to fix and the value it got, e.g. `train.lr=nan must be a finite number.`
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnexp.errors import ConfigError


def number(value, key: str, *, integer: bool = False, low=None, low_open: bool = False, high=None,
           high_open: bool = False, optional: bool = False):
    """`value` if it is a (finite) number in range, else a ConfigError naming `key`; None passes when optional."""
    if optional and value is None:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{key}={value!r} must be {'an integer' if integer else 'a number'}.")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number.")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}={value!r} must be {'>' if low_open else '>='} {low}.")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key}={value!r} must be {'<' if high_open else '<='} {high}.")
    return value


def choice(value, key: str, allowed: Iterable):
    """`value` if it is one of `allowed`, else a ConfigError listing them."""
    allowed = list(allowed)
    if value not in allowed or isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        raise ConfigError(f"{key}={value!r} must be one of {', '.join(map(str, allowed))}.")
    return value


def flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false.")
    return value


MAX_SEED = 2**32 - 1  # numpy's and TensorFlow's seeds are 32-bit


def seed(value, key: str, *, optional: bool = False):
    """A random seed: an integer in 0..2**32-1 (numpy and TensorFlow refuse anything else, mid-run)."""
    return number(value, key, integer=True, low=0, high=MAX_SEED, optional=optional)


def image_shape(value, key: str) -> tuple[int, int, int]:
    """[height, width, channels]: three positive integers, channels 1 (grayscale) or 3 (RGB)."""
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    if (items is None or len(items) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items)
            or items[2] not in (1, 3)):
        shown = items if items is not None else value
        raise ConfigError(f"{key}={shown!r} must be [height, width, channels]: three positive integers, channels "
                          "1 (grayscale) or 3 (RGB).")
    return tuple(items)


def mapping(value, key: str, what: str = "a mapping of keys to values") -> None:
    """A section that holds keys (a YAML mapping), e.g. `sweep:` in a sweep file."""
    if not isinstance(value, (dict, DictConfig)):
        raise ConfigError(f"{key}={_shown(value)} must be {what}.")


def overrides(value, key: str) -> None:
    """A list of override strings, e.g. a sweep file's `overrides:` (one string, such as train.epochs=1, per item)."""
    if not isinstance(value, (list, tuple, ListConfig)):
        raise ConfigError(f"{key}={_shown(value)} must be a list of overrides (strings such as train.epochs=1).")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{key}.{i}={_shown(item)} must be a string (an override such as train.epochs=1).")


def text(value, key: str, *, optional: bool = False):
    """A string (None passes when optional)."""
    if optional and value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}={_shown(value)} must be a string.")
    return value


def _shown(value) -> str:
    return repr(OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value)

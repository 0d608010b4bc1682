"""Value checks shared by every config section, sweep setting and layer field: one place, one wording.

Every message names the key to fix and the value it got, e.g. `train.lr=nan must be a finite number.`
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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

"""Every error that is the user's to fix, in one place, with one base class.

The CLIs print these in one line (`error: ...`) without a traceback; anything else is a bug
and keeps its traceback. Each message names the bad value and the config key or file to fix.
"""

from __future__ import annotations


class CnnexpError(Exception):
    """Base class: a problem with the user's config, data or environment, not a bug."""


class ConfigError(CnnexpError, ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key."""


class ModelConfigError(ConfigError):
    """An invalid architecture; the message names the layer's config key and the bad value."""


class DataError(CnnexpError):
    """A dataset is missing, malformed or unsafe; the message says what to do."""


class NonFiniteLossError(CnnexpError, RuntimeError):
    """Training produced a NaN, infinite or blown-up loss (often: learning rate too high)."""


class StorageError(CnnexpError):
    """A study storage, output or checkpoint folder can't be used; found before the first trial."""


class TrackingUnavailable(CnnexpError):
    """The MLflow store can't be used; the message names it and why. Never stops training: it becomes a warning."""

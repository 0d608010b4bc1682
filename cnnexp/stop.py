"""Stopping: one handler for SIGTERM, SIGHUP and SIGINT, shared by every entry point.

`scancel`, `timeout`, `kill` and Kubernetes send SIGTERM, an ssh drop sends SIGHUP, Ctrl-C sends
SIGINT: each becomes `Interrupted` (a KeyboardInterrupt), so whatever runs ends its MLflow run
KILLED and its trial FAIL (queued again to resume), and the CLI exits 130 with one line.

Raising from a signal handler can land inside library code that swallows the exception (JAX's
garbage-collection callback, a `try/except Exception` in a library): `REQUESTED` stays set, and
the loops check it (every batch end, before every trial, between timing runs).
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
REQUESTED = threading.Event()


class Interrupted(KeyboardInterrupt):
    """A stop was asked for (a signal): the running work ends KILLED and may be resumed."""


def _handle(signum, frame):
    REQUESTED.set()
    raise Interrupted(signal.Signals(signum).name)


def check() -> None:
    """Raise `Interrupted` if a stop was asked for (the flag a swallowed signal leaves behind)."""
    if REQUESTED.is_set():
        raise Interrupted("stop requested")


@contextlib.contextmanager
def on_signals():
    """While the block runs, SIGTERM, SIGHUP and SIGINT raise `Interrupted` (main thread only; nested: a no-op)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _handle:
        yield
        return
    REQUESTED.clear()
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_signals():
    """Ignore the stop signals from here on (the few lines that end runs after a stop must not be cut)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)

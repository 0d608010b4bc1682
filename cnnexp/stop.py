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
_DEFERRED = threading.Event()  # inside `deferred()`: the handler only sets REQUESTED, the loop raises at a batch end


class Interrupted(KeyboardInterrupt):
    """A stop was asked for (a signal): the running work ends KILLED and may be resumed."""


_HEARD: list[str] = []  # the name of the last stop signal, for the one line that says why the work stopped


def _handle(signum, frame):
    _HEARD[:] = [signal.Signals(signum).name]
    REQUESTED.set()
    if not _DEFERRED.is_set():
        raise Interrupted(_HEARD[0])


def check() -> None:
    """Raise `Interrupted` if a stop was asked for (the flag a swallowed or deferred signal leaves behind)."""
    if REQUESTED.is_set():
        raise Interrupted(_HEARD[0] if _HEARD else "stop requested")


@contextlib.contextmanager
def deferred():
    """While the block runs, a stop signal only sets REQUESTED; the block's loop raises at its next `check()`.

    Keras training: an exception raised at an arbitrary bytecode inside `fit` (TensorFlow's function dispatch,
    its iterators) was seen to corrupt the heap now and then (`free(): invalid next size`, the process aborted,
    its run left RUNNING: about 1 stop in 20); raised from a batch-end callback it never was.
    """
    was = _DEFERRED.is_set()
    _DEFERRED.set()
    try:
        yield
    finally:
        if not was:
            _DEFERRED.clear()
    check()


@contextlib.contextmanager
def on_signals():
    """While the block runs, SIGTERM, SIGHUP and SIGINT raise `Interrupted` (main thread only; nested: a no-op)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _handle:
        yield
        return
    REQUESTED.clear()
    _HEARD.clear()
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def ignoring_signals():
    """While the block runs, the stop signals are ignored: the few lines that end runs after a stop must not be
    cut by a second signal. The dispositions come back afterwards: ignored signals are inherited by every
    process started later (a `make` started by a library caller would ignore SIGTERM for good)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""Locks shared by every process that uses one store: a study's storage or a local MLflow database.

Files (SQLite, Optuna journal): an `flock` on a file beside them, which holds on one machine
and on shared file systems with working locks. PostgreSQL: an advisory lock in the database
itself, so workers on many machines agree without a shared file system.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path

from cnnexp.errors import StorageError
from cnnexp.paths import storage_file


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive `flock` on `path` (created if missing), released on exit."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as err:
        raise StorageError(f"Cannot create the lock file {path}: {err.strerror}; make {path.parent} writable.") from err
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def store_lock(url: str, name: str = "cnnexp"):
    """Hold a lock shared by every process of the store at `url`; `name` tells apart locks of one store."""
    path = storage_file(url)
    if path is not None:
        # Not "<file>.lock": Optuna's journal backend keeps its own lock under that name.
        with file_lock(path.with_name(f"{path.name}.{name}-lock")):
            yield
    elif url.startswith("postgresql"):
        with _postgres_advisory_lock(url, name):
            yield
    else:
        yield  # in-memory or another server: a single process


class _Engines:
    """One small SQLAlchemy engine per PostgreSQL URL, for its advisory locks (an explicit, per-process cache)."""

    def __init__(self):
        self.by_url: dict = {}

    def get(self, url: str):
        import sqlalchemy

        if url not in self.by_url:
            self.by_url[url] = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=1)
        return self.by_url[url]


ENGINES = _Engines()


@contextlib.contextmanager
def _postgres_advisory_lock(url: str, name: str):
    import sqlalchemy

    engine = ENGINES.get(url)
    key = int(hashlib.sha256(f"{name}-trial-slot".encode()).hexdigest()[:15], 16)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()

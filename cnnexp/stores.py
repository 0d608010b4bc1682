"""Store URLs: the one table of the schemes cnnexp knows, and per scheme its file, its lock and its name.

Optuna studies (`sweep.storage`) and MLflow runs (`tracking.uri`) are both addressed by URL. Every
module asks this table what a URL means instead of checking its prefix: which file is behind it,
how the processes that share it take turns (an `flock` beside a file, PostgreSQL's advisory lock,
a server that serialises for us), what it may hold (Optuna studies, MLflow runs), and how to name
it in a message without its password. A URL of a scheme not in the table is one line, never a
store without a lock. A new storage is one row here.

Files: an `flock` on a file beside them, which holds on one machine and on shared file systems with
working locks. PostgreSQL: an advisory lock in the database itself, so workers on many machines
agree without a shared file system.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cnnexp.errors import ConfigError, StorageError

OPTUNA, MLFLOW = "optuna", "mlflow"


@dataclass(frozen=True)
class Scheme:
    name: str
    prefixes: tuple[str, ...]
    holds: frozenset[str]     # what may live there: Optuna studies, MLflow runs
    file: bool                # a local file (or folder) is behind the URL
    lock: str                 # flock (a file beside it) | advisory (PostgreSQL) | server (it serialises itself)
    optuna: str = ""          # how Optuna opens it: rdb (SQLAlchemy, with heartbeats) | journal (a log file)


SCHEMES = (
    Scheme("sqlite", ("sqlite:///",), frozenset({OPTUNA, MLFLOW}), True, "flock", "rdb"),
    Scheme("journal", ("journal://", "journal:"), frozenset({OPTUNA}), True, "flock", "journal"),
    Scheme("postgresql", ("postgresql+psycopg://", "postgresql+psycopg2://", "postgresql://"),
           frozenset({OPTUNA, MLFLOW}), False, "advisory", "rdb"),
    Scheme("http", ("http://", "https://"), frozenset({MLFLOW}), False, "server"),
    Scheme("databricks", ("databricks",), frozenset({MLFLOW}), False, "server"),
    Scheme("file", ("file://",), frozenset({MLFLOW}), True, "flock"),   # MLflow's folder store (mlruns/)
)
EXAMPLES = {OPTUNA: "sqlite:///studies.db, postgresql://user:pass@host/db or journal:///shared/study.log",
            MLFLOW: "sqlite:///mlflow.db, http://host:5000 or postgresql://user:pass@host/db"}


@dataclass(frozen=True)
class Store:
    url: str
    scheme: Scheme

    @property
    def file(self) -> Path | None:
        """The file behind a SQLite or journal URL (None for servers and in-memory SQLite)."""
        if not self.scheme.file:
            return None
        prefix = next(p for p in self.scheme.prefixes if self.url.startswith(p))
        path = self.url.removeprefix(prefix).split("?", 1)[0]
        return None if not path or path.startswith(":") else Path(os.path.expanduser(path))

    @property
    def name(self) -> str:
        """How a message names it: the file, or the URL without its password."""
        return str(self.file) if self.file is not None else re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", self.url)

    def absolute(self) -> str:
        """The URL with its file made absolute, so that other processes and folders find the same store."""
        path = self.file
        if path is None or path.is_absolute():
            return self.url
        return f"{self.scheme.prefixes[0]}{path.resolve()}"

    def read_only_url(self) -> str:
        """A SQLite URL that SQLite itself opens read-only: nothing can be created or written through it."""
        if self.scheme.name != "sqlite" or self.file is None:
            return self.url
        return f"sqlite:///file:{self.file.resolve()}?mode=ro&uri=true"

    @contextlib.contextmanager
    def lock(self, name: str = "cnnexp"):
        """Hold a lock shared by every process of this store; `name` tells apart locks of one store."""
        if self.scheme.lock == "flock" and self.file is not None:
            # Not "<file>.lock": Optuna's journal backend keeps its own lock under that name.
            with file_lock(self.file.with_name(f"{self.file.name}.{name}-lock")):
                yield
        elif self.scheme.lock == "advisory":
            with _advisory_lock(self.url, name):
                yield
        else:  # a server serialises its clients; in-memory SQLite is one process
            yield


def parse(url, key: str = "sweep.storage", role: str = OPTUNA) -> Store:
    """The store a URL names; one ConfigError naming `key` for a scheme cnnexp does not know or `role` can't use."""
    text = str(url or "")
    for scheme in SCHEMES:
        if text.startswith(scheme.prefixes):
            if role not in scheme.holds:
                raise ConfigError(f"{key}={text!r}: a {scheme.name} URL can't hold {role} data; use {EXAMPLES[role]}.")
            return Store(text, scheme)
    raise ConfigError(f"{key}={text!r} is not a store cnnexp knows; use {EXAMPLES[role]}.")


def lock(url: str, name: str = "cnnexp", key: str = "sweep.storage"):
    """`parse(url).lock(name)`, for callers that hold a URL."""
    return parse(url, key, MLFLOW if name == "mlflow" else OPTUNA).lock(name)


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


class _Engines:
    """One small SQLAlchemy engine per PostgreSQL URL, for its advisory locks (an explicit, per-process cache)."""

    def __init__(self):
        self.by_url: dict = {}

    def get(self, url: str):
        import sqlalchemy

        if url not in self.by_url:
            self.by_url[url] = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=1)
        return self.by_url[url]

    def clear(self) -> None:
        for engine in self.by_url.values():
            engine.dispose()
        self.by_url.clear()


ENGINES = _Engines()


@contextlib.contextmanager
def _advisory_lock(url: str, name: str):
    import sqlalchemy

    key = int(hashlib.sha256(f"{name}-trial-slot".encode()).hexdigest()[:15], 16)
    with ENGINES.get(url).connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()


def sqlite_tables(path: Path) -> tuple[str, set[str]]:
    """(SQLite's quick_check, the tables) of a database file, opened read-only: a damaged file is never written."""
    try:
        with contextlib.closing(sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)) as db:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        return str(err), set()
    return problem, tables


# The tables that tell whose a SQLite file is: each library adds its own tables to any file it is pointed at.
OWN_TABLES = {OPTUNA: {"studies", "trials"}, MLFLOW: {"experiments", "runs"}}
NAMES = {OPTUNA: "an Optuna study storage", MLFLOW: "an MLflow store"}


def store_kind(path: Path) -> str | None:
    """What an existing SQLite file holds, read without writing anything; None for a missing or empty file.

    Returns:
        'an MLflow store', 'an Optuna study storage', 'a SQLite database of something else (tables ...)' or
        'not a SQLite database (...)'.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    problem, tables = sqlite_tables(path)
    if problem != "ok":
        return f"not a usable SQLite database ({problem})"
    if not tables:
        return None
    kind = next((NAMES[role] for role, marks in OWN_TABLES.items() if marks <= tables), None)
    return kind or f"a SQLite database of something else (tables {', '.join(sorted(tables)[:5])})"


def check_sqlite(store: Store, key: str, role: str) -> None:
    """A SQLite file that exists must be whole and belong to `role` (never an Optuna file as an MLflow store, or
    the reverse): one StorageError naming it, before anything is written to it."""
    path = store.file
    if store.scheme.name != "sqlite" or path is None:
        return
    kind = store_kind(path)
    ours = OWN_TABLES[role] & sqlite_tables(path)[1] if kind is not None else set()
    if ours and kind != NAMES[next(r for r in NAMES if r != role)]:
        return  # ours, perhaps still being created by another worker (its tables appear one by one)
    if kind is not None and kind != NAMES[role]:
        raise StorageError(f"{key}={store.url}: {path} is {kind}, not {NAMES[role]}; point {key} at another file"
                           + (" or move the damaged one away." if kind.startswith("not") else "."))


def check_writable(folder: Path, key: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it; else one StorageError naming `key`.

    A probe file is written and removed, so that a read-only mount, a full disk or a missing
    permission is found now, not after an hour of training.
    """
    folder = Path(os.path.expanduser(str(folder)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cnnexp-probe-{os.getpid()}"
        with open(probe, "w") as handle:
            handle.write("probe")
        probe.unlink()
    except OSError as err:
        raise StorageError(f"{key}: can't write to {folder} ({err.strerror or err}); point {key} at a writable "
                           "folder with free space.") from err
    return folder

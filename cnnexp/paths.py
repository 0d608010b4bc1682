"""Files behind store URLs, whose they are (MLflow's, Optuna's), and the one check that a folder can be written."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

from cnnexp.errors import StorageError


def storage_file(url: str) -> Path | None:
    """The file behind a SQLite or journal URL (None for servers and in-memory stores)."""
    for prefix in ("sqlite:///", "journal://", "journal:"):
        if url.startswith(prefix):
            path = url.removeprefix(prefix)
            return None if not path or path.startswith(":") else Path(path)
    return None


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


# The tables that tell whose a SQLite file is: each library adds its own tables to any file it is pointed at.
STORE_TABLES = {"an MLflow store": {"experiments", "runs"}, "an Optuna study storage": {"studies", "trials"}}


def store_kind(path: Path) -> str | None:
    """What an existing SQLite file holds, read without writing anything; None for a missing or empty file.

    Returns:
        'an MLflow store', 'an Optuna study storage', 'a SQLite database of something else (tables ...)' or
        'not a SQLite database'.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError:
        return "not a SQLite database"
    if not tables:
        return None
    kind = next((kind for kind, marks in STORE_TABLES.items() if marks <= tables), None)
    return kind or f"a SQLite database of something else (tables {', '.join(sorted(tables)[:5])})"

"""Files behind store URLs, and the one check that a folder can be written, made before any work starts."""

from __future__ import annotations

import os
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

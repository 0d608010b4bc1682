"""The decoded-array cache: `$CNNEXP_CACHE_DIR` (default ~/.cache/cnnexp), one .npz per decode.

Promises:
- A cache file is used only when it reads back whole, its sha256 over every array matches the one
  stored inside it, and it was made from the same source (sha256 of the staged file). Anything
  else (truncated, bit-flipped, another version's layout, another source) logs ONE warning naming
  the file and why, and the caller rebuilds it. The caller also checks what the arrays describe
  (`cnnexp.raw.problem`), so a valid file with the wrong data is rebuilt too. Never a traceback.
- Files are written through a temporary `<name>~<host>~<pid>~<token>.npz.tmp` and renamed, so
  readers never see half a file. Temporaries left by killed runs are removed on the next run, but
  only when their process is not alive on this host, or they are older than a day: another live
  worker's file is never touched.
- A folder that cannot be written (read-only, not a folder, disk full) logs one warning per
  folder and the run goes on without a cache. Nothing here ever unpickles: every np.load passes
  allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bumped when the cache layout changes, so that old files are not misread.
# 2: arrays carry a sha256 and the source fingerprint; image folders are cached per selection.
# 3: a fixed evaluation set (dataset.eval_limit) beside the subsets; folder fingerprints cover the tree.
CACHE_VERSION = 3
STALE_AFTER_S = 24 * 3600
_HOST = socket.gethostname().replace("~", "-")
_CHECKSUM, _SOURCE = "__sha256__", "__source__"


class _Folders:
    """What this process learnt of its cache folders: cleaned of leftovers already, or not writable (an
    explicit cache)."""

    def __init__(self):
        self.cleaned: set[Path] = set()
        self.unwritable: set[Path] = set()

    def clear(self) -> None:
        self.cleaned.clear()
        self.unwritable.clear()


FOLDERS = _Folders()


class DecodeCache:
    """One cache folder. `get_or_build` is the whole protocol: read and verify, else build and store."""

    def __init__(self, folder: Path):
        self.folder = Path(os.path.expanduser(str(folder)))
        if self.folder not in FOLDERS.cleaned:
            FOLDERS.cleaned.add(self.folder)
            clean_leftovers(self.folder)

    def file(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def get_or_build(self, key: str, source: str, build: Callable[[], dict[str, np.ndarray]],
                     check: Callable[[dict[str, np.ndarray]], str | None]) -> dict[str, np.ndarray]:
        """The arrays stored under `key`, if intact, made from `source` and passing `check`; else `build()`.

        `check` returns why the arrays cannot be right, or None; freshly built arrays are checked by
        the builder itself, not here.
        """
        arrays = self.get(key, source)
        if arrays is not None:
            why = check(arrays)
            if why is None:
                return arrays
            log.warning("Ignoring the decode cache %s: it describes the wrong data (%s); rebuilding it.",
                        self.file(key), why)
        arrays = build()
        self.put(key, arrays, source)
        return arrays

    def get(self, key: str, source: str) -> dict[str, np.ndarray] | None:
        path = self.file(key)
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except (FileNotFoundError, NotADirectoryError):
            return None
        except Exception as err:  # any way a cache file can be broken means "rebuild"
            log.warning("Ignoring the decode cache %s: it cannot be read (%s: %s); rebuilding it.",
                        path, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None
        checksum, made_from = arrays.pop(_CHECKSUM, None), arrays.pop(_SOURCE, None)
        if checksum is None or str(checksum) != checksum_of(arrays):
            log.warning("Ignoring the decode cache %s: its contents do not match their sha256 (damaged on disk); "
                        "rebuilding it.", path)
            return None
        if made_from is None or str(made_from) != source:
            log.warning("Ignoring the decode cache %s: it was made from another source; rebuilding it.", path)
            return None
        return arrays

    def put(self, key: str, arrays: dict[str, np.ndarray], source: str) -> None:
        """Store atomically; an unwritable folder only costs a warning (once) and a decode next time."""
        if self.folder in FOLDERS.unwritable:
            return
        target = self.file(key)
        tmp = target.with_name(f"{key}~{_HOST}~{os.getpid()}~{secrets.token_hex(4)}.npz.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as handle:
                np.savez(handle, **arrays, **{_CHECKSUM: np.array(checksum_of(arrays)), _SOURCE: np.array(source)})
            os.replace(tmp, target)
        except OSError as err:
            _remove(tmp)
            FOLDERS.unwritable.add(self.folder)
            log.warning("cannot write the decode cache in %s: %s; decoding each time.", self.folder, err)
        except BaseException:
            _remove(tmp)
            raise


def checksum_of(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{np.shape(arrays[name])}|".encode())
        digest.update(array)
    return digest.hexdigest()


def clean_leftovers(folder: Path) -> int:
    """Remove temporaries of interrupted runs whose process is gone; returns how many were removed."""
    candidates = list(folder.glob("*.npz.tmp"))
    removed = sum(_remove(path) for path in candidates if _abandoned(path))
    if removed:
        log.info("Removed %d file(s) left half-written by interrupted runs in %s", removed, folder)
    return removed


def _abandoned(path: Path) -> bool:
    """Left by a process that is gone: its pid is dead on this host, or it is older than a day."""
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    if age > STALE_AFTER_S:
        return True
    parts = path.name.split("~")  # <key>~<host>~<pid>~<token>.npz.tmp
    if len(parts) < 4 or parts[1] != _HOST or not parts[2].isdigit() or int(parts[2]) < 1:
        return False  # another host's, or an older version's name without a pid: wait for the day
    return not _alive(int(parts[2]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return True
    except OSError:
        return False

"""Where a dataset comes from: one lookup, offline first, for every entry point.

Order: `dataset.path`, then the Keras cache (`$KERAS_HOME/datasets`, default `~/.keras/datasets`),
then the shared data folder (`$CNNEXP_SHARED_DATA`, default `../shared/data` beside the project:
the CIFAR-10 image-folder copy and MNIST's t10k digits), then a download, only when
`dataset.download` is true and the network answers. Nothing staged and no network: one line that
names the file to stage and where.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from cnnexp import PROJECT_ROOT
from cnnexp.errors import DataError

# What each dataset may be staged as, in the order they are tried; the first is what to stage.
STANDARD = {
    "cifar10": ["cifar-10-python.tar.gz", "cifar-10-batches-py",
                "cifar-10-batches-py_extracted/cifar-10-batches-py",  # where Keras 3 extracts it
                "cifar-10-batches-py.tar.gz"],  # the name Keras saves its download under
    "mnist": ["mnist.npz", "mnist"],
    "fashion_mnist": ["fashion-mnist"],
}
# Copies in the shared data folder, read with another reader (said wherever the result is shown).
SHARED = {"cifar10": "cifar10-jpeg.tar.gz", "mnist": "mnist-t10k"}
SHARED_NOTES = {
    "cifar10": "CIFAR-10 from its JPEG re-encoding ({path}): labels and split are the original ones, pixels differ "
               "slightly (lossy); stage cifar-10-python.tar.gz for the original pixels",
}


@dataclass(frozen=True)
class Source:
    """A located dataset: its path (None: download it) and how to read it."""

    path: Path | None
    reader: str        # cifar10 | mnist_npz | mnist_idx | idx_folder | image_tree | download
    note: str = ""     # what every result on this data must say about it


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded datasets: $KERAS_HOME/datasets or ~/.keras/datasets."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets"


def shared_data_dir() -> Path:
    """The workplace's shared data folder: $CNNEXP_SHARED_DATA, else ../shared/data beside the project."""
    return Path(os.environ.get("CNNEXP_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")


def locate(dataset_cfg) -> Source:
    """Find the dataset that `dataset_cfg` describes (see the module docstring for the order)."""
    name = str(dataset_cfg.name)
    if name == "folder":
        return Source(_given_path(dataset_cfg, required=True), "image_tree")
    if name not in STANDARD:
        raise DataError(f"Unknown dataset.name={name!r}: use cifar10, mnist, fashion_mnist or folder.")
    given = _given_path(dataset_cfg)
    if given is not None:
        found = _within(given, STANDARD[name]) or _within(given, [SHARED.get(name, "")]) or given
        return _source(name, found)
    for folder in (keras_cache_dir(), shared_data_dir()):
        found = _within(folder, STANDARD[name] if folder == keras_cache_dir() else [SHARED.get(name, "")])
        if found is not None:
            return _source(name, found)
    if dataset_cfg.get("download") and _online():
        return Source(None, "download")
    why = "dataset.download is false" if not dataset_cfg.get("download") else "there is no network"
    shared = f", or put {SHARED[name]} in {shared_data_dir()} ($CNNEXP_SHARED_DATA)" if name in SHARED else ""
    raise DataError(f"The {name} dataset is not staged and {why}: stage it as {keras_cache_dir() / STANDARD[name][0]}"
                    f" ($KERAS_HOME/datasets), or pass dataset.path=/path/to/{STANDARD[name][0]}{shared}.")


def _given_path(dataset_cfg, required: bool = False) -> Path | None:
    if not dataset_cfg.get("path"):
        if required:
            raise DataError("dataset=folder needs dataset.path=/path/to/folder (or .tar.gz / .zip).")
        return None
    path = Path(os.path.expanduser(str(dataset_cfg.path)))
    if not path.exists():
        raise DataError(f"dataset.path={dataset_cfg.path!r} does not exist.")
    return path


def _within(folder: Path, names: list[str]) -> Path | None:
    if not folder.is_dir():
        return None
    for name in names:
        if name and (folder / name).exists():
            return folder / name
    return None


def _source(name: str, path: Path) -> Source:
    """How to read what was found: the standard layout, or the shared copy in its own format."""
    if name == "cifar10":
        # The standard batches (a folder holding data_batch_1, or any archive but the shared copy),
        # else an image-folder tree of CIFAR-10 such as the shared JPEG copy.
        image_tree = path.name == SHARED["cifar10"] or (path.is_dir() and not (path / "data_batch_1").exists())
        if not image_tree:
            return Source(path, "cifar10")
        return Source(path, "image_tree", SHARED_NOTES["cifar10"].format(path=path))
    if name == "mnist":
        if path.is_dir() and (path / "mnist.npz").exists():
            return Source(path / "mnist.npz", "mnist_npz")
        if path.is_dir() and any(path.glob("*-idx3-ubyte.gz")):
            return Source(path, "mnist_idx")
        return Source(path, "mnist_npz")
    return Source(path, "idx_folder")


def _online(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def fingerprint_path(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder tree's structure and regular files' contents.

    Links are never followed, not even to hash them: a link in the tree contributes its own
    path and target text, so that the fingerprint (and the caches keyed by it) change when the
    tree changes, but nothing outside the tree is read. Folders count too, empty ones included.
    """
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(digest, path, path.name)
        return digest.hexdigest()
    for folder, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        relative = os.path.relpath(folder, path)
        digest.update(f"D|{relative}\0".encode())
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]):
            full = os.path.join(folder, name)
            info = os.lstat(full)
            if stat.S_ISREG(info.st_mode):
                _hash_file(digest, Path(full), os.path.join(relative, name))
            elif stat.S_ISLNK(info.st_mode):
                digest.update(f"L|{os.path.join(relative, name)}|{os.readlink(full)}\0".encode())
            else:
                digest.update(f"S|{os.path.join(relative, name)}|{stat.S_IFMT(info.st_mode)}\0".encode())
    return digest.hexdigest()


def _hash_file(digest, path: Path, name: str) -> None:
    digest.update(f"F|{name}\0".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)

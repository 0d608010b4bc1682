"""Data stage: find a dataset offline, decode it once (cached by content), subset, scale, split.

Every loader works from a staged file. Downloads happen only when nothing is staged,
`dataset.download` is true and the network answers; otherwise one clear error says
which file to stage and where. The pieces: `cnnexp.formats` (CIFAR-10 batches, mnist.npz, idx),
`cnnexp.folders` (image-folder trees and archives), `cnnexp.cache` (the verified decode cache),
`cnnexp.raw` (decoded arrays, their checks, seeded subsets). Every user-fixable problem is one
`DataError` (from `cnnexp.errors`, re-exported here), never a traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnexp.data import folders, formats
from cnnexp.data.cache import CACHE_VERSION, DecodeCache
from cnnexp.errors import DataError
from cnnexp.data.raw import RawDataset, problem, stratified_sample, subset_indices

__all__ = ["Dataset", "RawDataset", "DataError", "load_dataset", "load_raw", "describe", "stratified_sample",
           "keras_cache_dir", "fingerprint_path"]

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Arrays ready for Keras: images float32 (N, H, W, C), labels int32 class indices."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    fingerprint: str  # sha256 of the source, plus the subset and split that were taken
    note: str = ""    # said wherever the result is shown (e.g. MNIST answered on its t10k digits only)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------------
# Public entry point


def load_dataset(dataset_cfg, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load, subset, scale and split the dataset that `dataset_cfg` describes.

    Args:
        dataset_cfg: the `dataset` config group (name, path, limits, scale, ...).
        val_fraction: share of the training split held out for validation, stratified.
        seed: seeds the validation split (subsets use `dataset.subset_seed`).

    Returns:
        A `Dataset` whose subsets are stratified and seeded, never "the first N".
    """
    raw = _subset(dataset_cfg)
    x_train, y_train, x_test, y_test = raw.x_train, raw.y_train, raw.x_test, raw.y_test

    n_val = int(round(len(y_train) * val_fraction)) if val_fraction else 0
    if n_val and (n_val < len(raw.class_names) or len(y_train) - n_val < 1):
        raise DataError(
            f"train.val_fraction={val_fraction} of {len(y_train)} training images leaves too few "
            f"for a stratified validation split over {len(raw.class_names)} classes; "
            "raise dataset.train_limit or train.val_fraction."
        )
    val_pick = stratified_sample(y_train, n_val, np.random.default_rng(seed)) if n_val else []
    is_val = np.zeros(len(y_train), bool)
    is_val[val_pick] = True

    scale = _scaler(dataset_cfg.scale, x_train[~is_val])
    fingerprint = hashlib.sha256(
        f"{raw.fingerprint}|{dataset_cfg.train_limit}|{dataset_cfg.test_limit}|"
        f"{dataset_cfg.subset_seed}|{val_fraction}|{seed}|{dataset_cfg.scale}".encode()
    ).hexdigest()
    return Dataset(
        x_train=scale(x_train[~is_val]),
        y_train=y_train[~is_val],
        x_val=scale(x_train[is_val]),
        y_val=y_train[is_val],
        x_test=scale(x_test),
        y_test=y_test,
        class_names=raw.class_names,
        fingerprint=fingerprint[:16],
        note=raw.note,
    )


def load_raw(dataset_cfg) -> RawDataset:
    """The decoded dataset, from the cache when this exact source was decoded before."""
    name = dataset_cfg.name
    if name == "cifar10":
        source = _locate(dataset_cfg, _CIFAR10_CANDIDATES, "cifar-10-python.tar.gz")
        read, shape = formats.read_cifar10, (32, 32, 3)
    elif name == "mnist":
        source = _locate(dataset_cfg, ["mnist.npz", "mnist-t10k"], "mnist.npz")
        is_idx = source is not None and source.is_dir() and (source / formats.T10K_IMAGES).exists()
        read, shape = (formats.read_mnist_idx if is_idx else formats.read_mnist_npz), (28, 28, 1)
    elif name == "fashion_mnist":
        source = _locate(dataset_cfg, ["fashion-mnist"], "fashion-mnist/ (the four idx .gz files)")
        read, shape = formats.read_idx_folder, (28, 28, 1)
    elif name == "folder":
        source = _folder_source(dataset_cfg)
        return folders.load(source, dataset_cfg, fingerprint_path(source), _cache(dataset_cfg))
    else:
        raise DataError(
            f"Unknown dataset.name={name!r}: use cifar10, mnist, fashion_mnist or folder."
        )
    if source is None:  # nothing staged and a download was possible
        return _download(name)

    digest = fingerprint_path(source)

    def build() -> dict[str, np.ndarray]:
        raw = read(source)
        why = problem(raw, shape)
        if why:
            raise DataError(f"{source} does not hold a usable {name} dataset: {why}.")
        return raw.to_arrays()

    arrays = _cache(dataset_cfg).get_or_build(
        f"{name}-v{CACHE_VERSION}-{digest[:20]}", digest, build,
        lambda stored: problem(RawDataset.from_arrays(stored, digest), shape),
    )
    raw = RawDataset.from_arrays(arrays, digest)
    if read is formats.read_mnist_idx and not (source / "train-images-idx3-ubyte.gz").exists():
        raw.note = formats.T10K_NOTE
    return raw


def describe(data: Dataset) -> str:
    """One line for logs: sizes of the splits and the image shape."""
    return (f"{len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test images "
            f"of {'x'.join(map(str, data.input_shape))}, {data.num_classes} classes")


# --------------------------------------------------------------------------------------------
# Subsets and scaling


def _subset(dataset_cfg) -> RawDataset:
    """The rows `dataset.train_limit`/`test_limit` pick, in their seeded order.

    An image folder decodes only those rows; any other source is decoded whole, then sampled
    with the same `subset_indices`, so both give the same rows in the same order.
    """
    if dataset_cfg.name == "folder" and (dataset_cfg.train_limit is not None or dataset_cfg.test_limit is not None):
        source = _folder_source(dataset_cfg)
        return folders.load(source, dataset_cfg, fingerprint_path(source), _cache(dataset_cfg), subset=True)
    raw = load_raw(dataset_cfg)
    train_idx, test_idx = subset_indices(raw.y_train, raw.y_test, dataset_cfg)
    return RawDataset(raw.x_train[train_idx], raw.y_train[train_idx], raw.x_test[test_idx], raw.y_test[test_idx],
                      raw.class_names, raw.fingerprint, raw.skipped)


def _scaler(mode: str, x_fit: np.ndarray):
    """The pixel scaling. Raw 0-255 inputs are what left the notebook's SGD at chance."""
    if mode == "unit":
        return lambda x: x.astype(np.float32) / np.float32(255)
    if mode == "standardize":
        mean = x_fit.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        std = x_fit.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32) + np.float32(1e-6)
        return lambda x: (x.astype(np.float32) - mean) / std
    raise DataError(f"dataset.scale={mode!r} is not one of: unit, standardize.")


# --------------------------------------------------------------------------------------------
# Locating staged files (offline first)

_CIFAR10_CANDIDATES = [
    "cifar-10-batches-py",
    "cifar-10-batches-py_extracted/cifar-10-batches-py",  # where Keras 3 extracts it
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py.tar.gz",  # the name Keras saves the download under
]


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded datasets: $KERAS_HOME/datasets or ~/.keras/datasets."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets"


def _cache(dataset_cfg) -> DecodeCache:
    return DecodeCache(Path(os.path.expanduser(str(dataset_cfg.cache_dir))))


def _locate(dataset_cfg, candidates: list[str], stage_as: str) -> Path | None:
    """dataset.path, then the Keras cache; None means "download" (only if allowed and online)."""
    if dataset_cfg.path:
        path = Path(os.path.expanduser(str(dataset_cfg.path)))
        if path.is_dir():
            for candidate in candidates:
                if (path / candidate).exists():
                    return path / candidate
            if any(path.glob("*")):  # the folder itself is the extracted dataset
                return path
        elif path.exists():
            return path
        raise DataError(
            f"dataset.path={dataset_cfg.path!r} does not exist or holds no {dataset_cfg.name} "
            f"files; it should be {stage_as} or a folder holding it."
        )
    searched = keras_cache_dir()
    for candidate in candidates:
        if (searched / candidate).exists():
            return searched / candidate
    fallback = dataset_cfg.get("fallback_path")
    if fallback and Path(os.path.expanduser(str(fallback))).exists():
        return Path(os.path.expanduser(str(fallback)))  # e.g. MNIST's t10k digits, said so in the report
    if dataset_cfg.download and _online():
        return None
    why = "dataset.download is false" if not dataset_cfg.download else "there is no network"
    raise DataError(
        f"The {dataset_cfg.name} dataset is not staged and {why}.\n"
        f"  Stage it as:  {searched / stage_as}\n"
        f"  (or set dataset.path=/path/to/{stage_as}; the Keras cache folder follows $KERAS_HOME)"
    )


def _folder_source(dataset_cfg) -> Path:
    if not dataset_cfg.path:
        raise DataError("dataset=folder needs dataset.path=/path/to/folder (or .tar.gz / .zip).")
    path = Path(os.path.expanduser(str(dataset_cfg.path)))
    if not path.exists():
        raise DataError(f"dataset.path={dataset_cfg.path!r} does not exist.")
    return path


def _online(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download(name: str) -> RawDataset:
    from cnnexp.runtime import keras

    log.info("Downloading %s with keras.datasets (nothing staged locally)", name)
    loader = getattr(keras().datasets, name)
    (x_train, y_train), (x_test, y_test) = loader.load_data()
    raw = RawDataset(
        _nhwc(x_train), y_train.reshape(-1).astype(np.int32),
        _nhwc(x_test), y_test.reshape(-1).astype(np.int32),
        [str(i) for i in range(10)], "",
    )
    raw.fingerprint = hashlib.sha256(raw.x_train.tobytes()[:1 << 24]).hexdigest()
    return raw


def _nhwc(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x  # grayscale gets a channel axis


def fingerprint_path(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's file names, sizes and contents."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

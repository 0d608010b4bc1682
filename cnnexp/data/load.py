"""Load a dataset for training: decoded once (cached by content), subset, split and scaled.

Every loader works from a staged file (`cnnexp.data.locate`: dataset.path, the Keras cache, the
shared data folder; a download only when nothing is staged, `dataset.download` is true and the
network answers). The pieces: `formats` (CIFAR-10 batches, mnist.npz, idx), `folders` (image-folder
trees and archives), `cache` (the verified decode cache), `raw` (decoded arrays, their checks, seeded
subsets). Every user-fixable problem is one `DataError`, never a traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnexp.data import folders, formats
from cnnexp.data.cache import CACHE_VERSION, DecodeCache
from cnnexp.data.locate import Source, fingerprint_path, locate
from cnnexp.data.raw import RawDataset, problem, smallest_limit, stratified_sample, subset_indices
from cnnexp.errors import DataError
from cnnexp.runtime import keras

log = logging.getLogger(__name__)

DECODE_KEYS = ("name", "input_shape", "test_fraction", "max_image_pixels", "max_bad_fraction", "cache_dir")
SHAPES = {"cifar10": (32, 32, 3), "mnist_npz": (28, 28, 1), "mnist_idx": (28, 28, 1), "idx_folder": (28, 28, 1)}
READERS = {"cifar10": formats.read_cifar10, "mnist_npz": formats.read_mnist_npz, "mnist_idx": formats.read_mnist_idx,
           "idx_folder": formats.read_idx_folder}


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
    source: str = ""  # the file or folder it was read from ("keras.datasets" for a download)
    note: str = ""    # said wherever the result is shown (e.g. MNIST answered on its t10k digits only)
    shared_eval: bool = False  # x_val is the study's fixed evaluation set (dataset.eval_limit)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_dataset(dataset_cfg, val_fraction: float = 0.1, seed: int = 0, decoded: dict | None = None) -> Dataset:
    """Load, subset, scale and split the dataset that `dataset_cfg` describes.

    Args:
        dataset_cfg: the `dataset` config group (name, path, limits, scale, ...).
        val_fraction: share of the training subset held out for validation, stratified; unused
            when `dataset.eval_limit` gives a fixed evaluation set from the images the subset leaves.
        seed: seeds the validation split (the training subset uses `dataset.subset_seed`).
        decoded: keep whole decoded datasets here between calls (a sweep's worker: every trial takes its own
            subset of the same images in memory, instead of decoding them again).

    Returns:
        A `Dataset` whose subsets are stratified and seeded, never "the first N".
    """
    source = locate(dataset_cfg)
    raw = _subset(dataset_cfg, source, decoded)
    x_train, y_train = raw.x_train, raw.y_train
    if raw.y_eval is not None and len(raw.y_eval):
        is_val = np.zeros(len(y_train), bool)  # the whole subset trains; the fixed eval set validates
    else:
        is_val = _validation_rows(y_train, val_fraction, seed, len(raw.class_names))
    scale = _scaler(dataset_cfg.scale, x_train[~is_val])
    x_val, y_val = (raw.x_eval, raw.y_eval) if raw.y_eval is not None and len(raw.y_eval) else \
        (x_train[is_val], y_train[is_val])
    fingerprint = hashlib.sha256(
        f"{raw.fingerprint}|{dataset_cfg.train_limit}|{dataset_cfg.test_limit}|{dataset_cfg.get('eval_limit')}|"
        f"{dataset_cfg.subset_seed}|{val_fraction}|{seed}|{dataset_cfg.scale}".encode()
    ).hexdigest()
    return Dataset(
        x_train=scale(x_train[~is_val]), y_train=y_train[~is_val], x_val=scale(x_val), y_val=y_val,
        x_test=scale(raw.x_test), y_test=raw.y_test, class_names=raw.class_names, fingerprint=fingerprint[:16],
        source=str(source.path or "keras.datasets"), note="; ".join(filter(None, [source.note, raw.note])),
        shared_eval=raw.y_eval is not None and len(raw.y_eval) > 0,
    )


def _validation_rows(y_train: np.ndarray, val_fraction: float, seed: int, n_classes: int) -> np.ndarray:
    """A stratified, seeded validation split of the training subset, as a mask."""
    n_val = int(round(len(y_train) * val_fraction)) if val_fraction else 0
    if val_fraction and (n_val < n_classes or len(y_train) - n_val < n_classes):
        raise DataError(
            f"train.val_fraction={val_fraction} of {len(y_train)} training images leaves too few "
            f"for a stratified validation split over {n_classes} classes: the smallest dataset.train_limit that "
            f"works is {smallest_limit(n_classes, val_fraction, False)} (or set dataset.eval_limit)."
        )
    is_val = np.zeros(len(y_train), bool)
    if n_val:
        is_val[stratified_sample(y_train, n_val, np.random.default_rng(seed))] = True
    return is_val


def load_raw(dataset_cfg, source: Source | None = None) -> RawDataset:
    """The decoded dataset, from the cache when this exact source was decoded before."""
    source = source or locate(dataset_cfg)
    if source.reader == "download":  # nothing staged and a download was possible
        return _download(str(dataset_cfg.name))
    digest = fingerprint_path(source.path)
    if source.reader == "image_tree":
        return folders.load(source.path, dataset_cfg, digest, _cache(dataset_cfg))
    read, shape = READERS[source.reader], SHAPES[source.reader]

    def build() -> dict[str, np.ndarray]:
        raw = read(source.path)
        why = problem(raw, shape)
        if why:
            raise DataError(f"{source.path} does not hold a usable {dataset_cfg.name} dataset: {why}.")
        return raw.to_arrays()

    arrays = _cache(dataset_cfg).get_or_build(
        f"{dataset_cfg.name}-v{CACHE_VERSION}-{digest[:20]}", digest, build,
        lambda stored: problem(RawDataset.from_arrays(stored, digest), shape),
    )
    raw = RawDataset.from_arrays(arrays, digest)
    if source.reader == "mnist_idx" and not (source.path / "train-images-idx3-ubyte.gz").exists():
        raw.note = formats.T10K_NOTE
    return raw


def summary_line(data: Dataset) -> str:
    """One line for logs: sizes of the splits and the image shape."""
    val = "eval (fixed)" if data.shared_eval else "val"
    return (f"{len(data.y_train)} train / {len(data.y_val)} {val} / {len(data.y_test)} test images "
            f"of {'x'.join(map(str, data.input_shape))}, {data.num_classes} classes")


def _subset(dataset_cfg, source: Source, decoded: dict | None = None) -> RawDataset:
    """The rows `dataset.train_limit`/`eval_limit`/`test_limit` pick, in their seeded order.

    An image tree decodes only those rows, unless `decoded` keeps whole decodes in memory; any other
    source is decoded whole, then sampled with the same `subset_indices`, so both give the same rows
    in the same order.
    """
    limited = any(dataset_cfg.get(k) is not None for k in ("train_limit", "test_limit", "eval_limit"))
    if source.reader == "image_tree" and limited and decoded is None:
        return folders.load(source.path, dataset_cfg, fingerprint_path(source.path), _cache(dataset_cfg), subset=True)
    if decoded is None:
        raw = load_raw(dataset_cfg, source)
    else:  # what the decode depends on: the source and how its images are read, never the subset
        key = (str(source.path), source.reader, *(str(dataset_cfg.get(k)) for k in DECODE_KEYS))
        raw = decoded.get(key)
        if raw is None:
            decoded.clear()  # one whole dataset in memory at a time
            raw = decoded[key] = load_raw(dataset_cfg, source)
    rows = subset_indices(raw.y_train, raw.y_test, dataset_cfg)
    return RawDataset(raw.x_train[rows.train], raw.y_train[rows.train], raw.x_test[rows.test], raw.y_test[rows.test],
                      raw.class_names, raw.fingerprint, raw.skipped, raw.note,
                      x_eval=raw.x_train[rows.eval], y_eval=raw.y_train[rows.eval])


def _scaler(mode: str, x_fit: np.ndarray):
    """The pixel scaling. Raw 0-255 inputs are what left the notebook's SGD at chance."""
    if mode == "unit":
        return lambda x: x.astype(np.float32) / np.float32(255)
    if mode == "standardize":
        mean = x_fit.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        std = x_fit.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32) + np.float32(1e-6)
        return lambda x: (x.astype(np.float32) - mean) / std
    raise DataError(f"dataset.scale={mode!r} is not one of: unit, standardize.")


def _cache(dataset_cfg) -> DecodeCache:
    return DecodeCache(Path(os.path.expanduser(str(dataset_cfg.cache_dir))))


def _download(name: str) -> RawDataset:
    log.info("Downloading %s with keras.datasets (nothing staged locally)", name)
    loader = getattr(keras().datasets, name)
    (x_train, y_train), (x_test, y_test) = loader.load_data()
    classes = {"cifar10": formats.CIFAR10_CLASSES, "fashion_mnist": formats.FASHION_MNIST_CLASSES}
    raw = RawDataset(
        formats.nhwc(x_train), y_train.reshape(-1).astype(np.int32),
        formats.nhwc(x_test), y_test.reshape(-1).astype(np.int32),
        list(classes.get(name, [str(i) for i in range(10)])), "",
    )
    raw.fingerprint = hashlib.sha256(raw.x_train.tobytes()[:1 << 24]).hexdigest()
    return raw

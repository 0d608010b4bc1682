"""Data stage: find a dataset offline, decode it once (cached by content), subset, scale, split.

Every loader works from a staged file. Downloads happen only when nothing is staged,
`dataset.download` is true and the network answers; otherwise one clear error says
which file to stage and where.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import shutil
import socket
import tarfile
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Bumped when the decoded-cache format changes, so that old caches are not misread.
CACHE_VERSION = 1


class DataError(Exception):
    """A dataset is missing, malformed or unsafe; the message says what to do."""


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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class RawDataset:
    """Decoded, unscaled images (uint8) with the original train/test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    fingerprint: str


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
    raw = load_raw(dataset_cfg)
    rng = np.random.default_rng(int(dataset_cfg.subset_seed))
    train_idx = _limit(raw.y_train, dataset_cfg.train_limit, rng, "dataset.train_limit")
    test_idx = _limit(raw.y_test, dataset_cfg.test_limit, rng, "dataset.test_limit")
    x_train, y_train = raw.x_train[train_idx], raw.y_train[train_idx]
    x_test, y_test = raw.x_test[test_idx], raw.y_test[test_idx]

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
    )


def load_raw(dataset_cfg) -> RawDataset:
    """The decoded dataset, from the cache when this exact source was decoded before."""
    name = dataset_cfg.name
    if name == "cifar10":
        source = _locate(dataset_cfg, _CIFAR10_CANDIDATES, "cifar-10-python.tar.gz")
        decode = _read_cifar10
    elif name == "mnist":
        source = _locate(dataset_cfg, ["mnist.npz"], "mnist.npz")
        decode = _read_mnist_npz
    elif name == "fashion_mnist":
        source = _locate(dataset_cfg, ["fashion-mnist"], "fashion-mnist/ (the four idx .gz files)")
        decode = _read_idx_folder
    elif name == "folder":
        source = _folder_source(dataset_cfg)
        decode = None
    else:
        raise DataError(
            f"Unknown dataset.name={name!r}: use cifar10, mnist, fashion_mnist or folder."
        )
    if source is None:  # nothing staged and a download was possible
        return _download(name)

    cache_dir = Path(os.path.expanduser(str(dataset_cfg.cache_dir)))
    digest = fingerprint_path(source)
    extra = ""
    if name == "folder":
        height, width, channels = _shape(dataset_cfg)
        extra = f"-{height}x{width}x{channels}-{dataset_cfg.test_fraction}"
    cached = cache_dir / f"{name}-v{CACHE_VERSION}-{digest[:20]}{extra}.npz"
    if cached.exists():
        with np.load(cached) as z:
            return RawDataset(
                z["x_train"], z["y_train"], z["x_test"], z["y_test"],
                [str(c) for c in z["class_names"]], digest,
            )
    if name == "folder":
        raw = _read_folder(source, dataset_cfg, cache_dir, digest)
    else:
        raw = decode(source)
    raw.fingerprint = digest
    _save_atomically(cached, raw)
    return raw


# --------------------------------------------------------------------------------------------
# Subsets and scaling


def stratified_sample(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `n` items drawn at random so that every class keeps its share of `y`."""
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * n / len(y)
    quota = np.floor(exact).astype(int)
    # Hand the rounding remainder to the classes that lost the most to rounding.
    quota[np.argsort(quota - exact, kind="stable")[: n - quota.sum()]] += 1
    picks = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota)]
    picked = np.concatenate(picks) if picks else np.array([], int)
    rng.shuffle(picked)
    return picked


def _limit(y: np.ndarray, limit, rng: np.random.Generator, key: str) -> np.ndarray:
    if limit is None or int(limit) >= len(y):
        return rng.permutation(len(y))
    if int(limit) < 1:
        raise DataError(f"{key}={limit} must be a positive number of images, or null for all.")
    return stratified_sample(y, int(limit), rng)


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
    if dataset_cfg.download and _online():
        return None
    why = "dataset.download is false" if not dataset_cfg.download else "there is no network"
    raise DataError(
        f"The {dataset_cfg.name} dataset is not staged and {why}.\n"
        f"  Stage it as:  {searched / stage_as}\n"
        f"  (or set dataset.path=/path/to/{stage_as}; the Keras cache folder follows $KERAS_HOME)"
    )


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


def _save_atomically(target: Path, raw: RawDataset) -> None:
    """Write the cache through a temporary file, so concurrent workers never read half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(
                handle, x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test,
                y_test=raw.y_test, class_names=np.array(raw.class_names),
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _nhwc(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


# --------------------------------------------------------------------------------------------
# Standard formats

_CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]


def _read_cifar10(source: Path) -> RawDataset:
    """The standard CIFAR-10 python layout, from its .tar.gz or its extracted folder.

    The batches are pickles, as published; read them only from a source you trust.
    """
    batches: dict[str, bytes] = {}
    if source.is_dir():
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            if (source / name).exists():
                batches[name] = (source / name).read_bytes()
    else:
        with tarfile.open(source) as archive:  # read in memory: nothing is written to disk
            for member in archive.getmembers():
                base = PurePosixPath(member.name).name
                if member.isfile() and (base.startswith("data_batch_") or base == "test_batch"):
                    batches[base] = archive.extractfile(member).read()
    train_names = sorted(n for n in batches if n.startswith("data_batch_"))
    if not train_names or "test_batch" not in batches:
        raise DataError(
            f"{source} is not in the CIFAR-10 python layout "
            "(cifar-10-batches-py/data_batch_1..5 and test_batch)."
        )

    def decode(blob: bytes):
        batch = pickle.loads(blob, encoding="bytes")
        x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.asarray(batch[b"labels"], np.int32)

    train = [decode(batches[n]) for n in train_names]
    x_test, y_test = decode(batches["test_batch"])
    return RawDataset(
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
        x_test, y_test, list(_CIFAR10_CLASSES), "",
    )


def _read_mnist_npz(source: Path) -> RawDataset:
    if source.is_dir():
        source = source / "mnist.npz"
    with np.load(source) as z:
        return RawDataset(
            _nhwc(z["x_train"]).astype(np.uint8), z["y_train"].astype(np.int32),
            _nhwc(z["x_test"]).astype(np.uint8), z["y_test"].astype(np.int32),
            [str(i) for i in range(10)], "",
        )


def _read_idx_folder(source: Path) -> RawDataset:
    """The four idx .gz files of (Fashion-)MNIST, as Keras stores them."""

    def read(stem: str, offset: int) -> np.ndarray:
        with gzip.open(source / f"{stem}.gz", "rb") as handle:
            return np.frombuffer(handle.read(), np.uint8, offset=offset)

    try:
        x_train = read("train-images-idx3-ubyte", 16).reshape(-1, 28, 28, 1)
        y_train = read("train-labels-idx1-ubyte", 8).astype(np.int32)
        x_test = read("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28, 1)
        y_test = read("t10k-labels-idx1-ubyte", 8).astype(np.int32)
    except FileNotFoundError as err:
        raise DataError(f"{source} lacks {Path(err.filename).name}.") from err
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return RawDataset(x_train, y_train, x_test, y_test, names, "")


# --------------------------------------------------------------------------------------------
# Image folders (directories or archives of them)


def _folder_source(dataset_cfg) -> Path:
    if not dataset_cfg.path:
        raise DataError("dataset=folder needs dataset.path=/path/to/folder (or .tar.gz / .zip).")
    path = Path(os.path.expanduser(str(dataset_cfg.path)))
    if not path.exists():
        raise DataError(f"dataset.path={dataset_cfg.path!r} does not exist.")
    return path


def _shape(dataset_cfg) -> tuple[int, int, int]:
    height, width, channels = (int(v) for v in dataset_cfg.input_shape)
    if channels not in (1, 3) or height < 1 or width < 1:
        raise DataError(
            f"dataset.input_shape={list(dataset_cfg.input_shape)} must be [height, width, 1 or 3]."
        )
    return height, width, channels


def _read_folder(source: Path, dataset_cfg, cache_dir: Path, digest: str) -> RawDataset:
    if source.is_file():
        target = cache_dir / "extracted" / digest[:20]
        if not target.exists():
            safe_extract(source, target)
        source = target
    root = _dataset_root(source)
    height, width, channels = _shape(dataset_cfg)
    if (root / "train").is_dir() and (root / "test").is_dir():
        class_names = _class_names(root / "train")
        train_files, y_train = _list_images(root / "train", class_names)
        test_files, y_test = _list_images(root / "test", class_names)
    else:
        class_names = _class_names(root)
        files, labels = _list_images(root, class_names)
        n_test = int(round(len(labels) * float(dataset_cfg.test_fraction)))
        test_pick = stratified_sample(labels, n_test, np.random.default_rng(0))
        is_test = np.zeros(len(labels), bool)
        is_test[test_pick] = True
        train_files = [f for f, t in zip(files, is_test) if not t]
        test_files = [f for f, t in zip(files, is_test) if t]
        y_train, y_test = labels[~is_test], labels[is_test]
    log.info("Decoding %d images from %s (cached afterwards)", len(train_files) + len(test_files), root)
    return RawDataset(
        _decode_images(train_files, height, width, channels), y_train,
        _decode_images(test_files, height, width, channels), y_test,
        class_names, digest,
    )


def _dataset_root(path: Path) -> Path:
    """Step into a lone top-level folder, as archives usually wrap their tree in one."""
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    while len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "test"):
        path = entries[0]
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return path


def _class_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise DataError(
            f"{folder} should hold one sub-folder per class (at least two); found {names or 'none'}."
        )
    return names


def _list_images(folder: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for index, name in enumerate(class_names):
        found = sorted(
            p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        files += found
        labels += [index] * len(found)
    if not files:
        raise DataError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}.")
    return files, np.asarray(labels, np.int32)


def _decode_images(files: list[Path], height: int, width: int, channels: int) -> np.ndarray:
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"

    def decode(file: Path) -> np.ndarray:
        with Image.open(file) as image:
            image = image.convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(image, np.uint8)

    out = np.empty((len(files), height, width, channels), np.uint8)
    # Pillow releases the GIL while decoding, so threads use every core.
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    try:
        for i, pixels in enumerate(pool.map(decode, files)):
            out[i] = pixels.reshape(height, width, channels)
    finally:
        # On Ctrl-C or SIGTERM, drop the queued images instead of decoding them all first.
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .tar(.gz) or .zip into `target`, refusing any member that would land outside.

    Every member is checked before anything is written: absolute paths, '..' escapes,
    links and devices are refused with an error naming the member.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    _check_member(archive, info.filename, staging, is_link, False)
                zf.extractall(staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for member in members:
                    _check_member(archive, member.name, staging, member.issym() or member.islnk(),
                                  not (member.isfile() or member.isdir()) and not member.issym()
                                  and not member.islnk())
                # The 'data' filter re-checks all of the above inside the standard library.
                tf.extractall(staging, members=members, filter="data")
        else:
            raise DataError(f"dataset.path={str(archive)!r} is neither a folder, a tar nor a zip archive.")
        try:
            os.replace(staging, target)
        except OSError:  # another worker finished the same extraction first
            if not target.exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _check_member(archive: Path, name: str, root: Path, is_link: bool, is_special: bool) -> None:
    path = PurePosixPath(name)
    resolved = (root / name).resolve()
    if path.is_absolute() or ".." in path.parts or not resolved.is_relative_to(root.resolve()):
        raise DataError(f"Refusing to extract {archive.name}: member {name!r} would land outside the target folder.")
    if is_link:
        raise DataError(f"Refusing to extract {archive.name}: member {name!r} is a link.")
    if is_special:
        raise DataError(f"Refusing to extract {archive.name}: member {name!r} is a device or pipe.")


def describe(data: Dataset) -> str:
    """One line for logs: sizes of the splits and the image shape."""
    return (f"{len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test images "
            f"of {'x'.join(map(str, data.input_shape))}, {data.num_classes} classes")

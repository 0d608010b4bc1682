"""The standard dataset formats, as Keras stores them: CIFAR-10 python batches, mnist.npz, idx .gz files.

Promises: every reader returns a `RawDataset` or raises one `DataError` naming the file.
Refuses: CIFAR-10 batches are pickles, so they are read with an unpickler that can build only
dicts, lists, ints, bytes and numpy arrays; a batch that asks for any other global (`os.system`,
`builtins.eval`, ...) is refused before any of it is used, naming the file and the global. Nothing
here uses pickle's own load functions or lets np.load unpickle. Idx and .npy headers are read before
any data: a header that declares more than MAX_ARRAY_BYTES (a bomb) is refused, naming the file.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from cnnexp.data.raw import RawDataset, stratified_sample
from cnnexp.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_MAX_BATCH_BYTES = 256 << 20  # a real batch is 31 MB
# What numpy arrays need to be rebuilt from a pickle, as Python 2 (the published files) or numpy 1
# and numpy 2 write them (protocol 5 uses _frombuffer); the same set keras.datasets.cifar10 allows.
_ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class _BatchUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays; refuses every other global, naming it."""

    def __init__(self, blob: bytes, where: str):
        super().__init__(io.BytesIO(blob), encoding="bytes")  # Python 2 str -> bytes, as published
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"Refusing to load {self.where}: it asks to run {module}.{name}, which a CIFAR-10 batch never does; "
            "the file is damaged or malicious. Delete it and stage cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html."
        )


def read_cifar10(source: Path) -> RawDataset:
    """The standard CIFAR-10 python layout, from its .tar.gz or its extracted folder.

    Archive members are read in memory; nothing is written to disk.
    """
    batches: dict[str, bytes] = {}
    if source.is_dir():
        for name in _BATCH_NAMES:
            if (source / name).is_file():
                batches[name] = (source / name).read_bytes()
    else:
        try:
            with tarfile.open(source) as archive:
                for member in archive:
                    base = PurePosixPath(member.name).name
                    if member.isfile() and base in _BATCH_NAMES:
                        if member.size > _MAX_BATCH_BYTES:
                            raise DataError(f"{source}:{member.name} is {member.size} bytes; a CIFAR-10 batch is "
                                            "31 MB. Stage the published cifar-10-python.tar.gz.")
                        batches[base] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{source} is not a readable .tar.gz ({err}); stage cifar-10-python.tar.gz again.") from err
    if not any(name.startswith("data_batch_") for name in batches) or "test_batch" not in batches:
        raise DataError(
            f"{source} is not in the CIFAR-10 python layout "
            "(cifar-10-batches-py/data_batch_1..5 and test_batch)."
        )
    where = f"{source}:" if source.is_file() else f"{source}/"
    train = [_read_batch(blob, where + name) for name, blob in sorted(batches.items()) if name != "test_batch"]
    x_test, y_test = _read_batch(batches["test_batch"], where + "test_batch")
    return RawDataset(
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
        x_test, y_test, list(CIFAR10_CLASSES), "",
    )


def _read_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch: a dict with b"data" uint8 (N, 3072) and b"labels" N ints in 0..9."""
    try:
        batch = _BatchUnpickler(blob, where).load()
    except DataError:
        raise
    except Exception as err:  # truncated or not a pickle at all
        raise DataError(f"{where} is not a readable CIFAR-10 batch ({type(err).__name__}: {err}); "
                        "stage cifar-10-python.tar.gz again.") from err
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}".strip()
        raise DataError(f"{where} is not a CIFAR-10 batch: b'data' should be a uint8 array of shape (N, 3072), "
                        f"found {found if isinstance(batch, dict) else type(batch).__name__}.")
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in labels):
        raise DataError(f"{where} is not a CIFAR-10 batch: b'labels' should be a list of ints.")
    y = np.asarray(labels, np.int64)
    low, high = (int(y.min()), int(y.max())) if len(y) else (0, 0)
    if y.shape != (len(data),) or low < 0 or high > 9:
        raise DataError(f"{where} is not a CIFAR-10 batch: {len(y)} labels in {low}..{high} "
                        f"for {len(data)} images (should be as many, in 0..9).")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int32)


# The real MNIST training images are 47 MB: an idx or .npy header asking for more is refused before any data is read.
MAX_ARRAY_BYTES = 256 << 20


def read_mnist_npz(source: Path) -> RawDataset:
    """mnist.npz with x_train, y_train, x_test, y_test (plain arrays; pickled objects are refused).

    Each member's .npy header is read first, never its data: a header that declares more than
    MAX_ARRAY_BYTES (a bomb: a small file that asks for gigabytes) or an object dtype is refused.
    """
    if source.is_dir():
        source = source / "mnist.npz"
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with zipfile.ZipFile(source) as archive:
            for key in keys:
                _check_npy_header(archive, f"{key}.npy", f"{source}:{key}")
        with np.load(source, allow_pickle=False) as z:
            arrays = {key: z[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{source} is not a readable mnist.npz ({type(err).__name__}: {err}).") from err
    return RawDataset(
        nhwc(arrays["x_train"]).astype(np.uint8), arrays["y_train"].astype(np.int32),
        nhwc(arrays["x_test"]).astype(np.uint8), arrays["y_test"].astype(np.int32),
        [str(i) for i in range(10)], "",
    )


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _check_npy_header(archive: zipfile.ZipFile, member: str, where: str) -> None:
    """The shape and dtype a .npy member declares, checked against MAX_ARRAY_BYTES before any data is read."""
    with archive.open(member) as handle:  # KeyError: no such member
        version = np.lib.format.read_magic(handle)
        if version not in _NPY_HEADERS:
            raise DataError(f"{where} is a .npy file of format {version[0]}.{version[1]}; mnist.npz holds 1.0 or 2.0.")
        shape, _, dtype = _NPY_HEADERS[version](handle)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(f"{where} holds {dtype} values; mnist.npz holds plain numbers (an object array would need "
                        "pickle, which is never used here).")
    size = math.prod(shape) * dtype.itemsize
    if size > MAX_ARRAY_BYTES:
        raise DataError(f"{where} declares {'x'.join(map(str, shape))} {dtype} = {size:,} bytes, more than an array "
                        f"here may hold ({MAX_ARRAY_BYTES:,}); it is damaged or malicious.")


IDX_UBYTE = 0x08


def read_idx(path: Path, dims: int) -> np.ndarray:
    """One idx .gz file of unsigned bytes with `dims` dimensions, its header checked before any data is read.

    A gzip bomb (a small file inflating to gigabytes) or a damaged header is a DataError: the size
    the header declares is checked against MAX_ARRAY_BYTES, and exactly that many bytes are read.
    """
    try:
        with gzip.open(path, "rb") as handle:
            header = handle.read(4 + 4 * dims)
            if len(header) < 4 + 4 * dims or header[:2] != b"\0\0" or header[2] != IDX_UBYTE or header[3] != dims:
                raise DataError(f"{path} is not an idx file of unsigned bytes with {dims} dimension(s) (its header "
                                f"starts {header[:4].hex() or 'empty'}).")
            shape = struct.unpack(f">{dims}I", header[4:])
            size = math.prod(shape)
            if size > MAX_ARRAY_BYTES:
                raise DataError(f"{path} declares {'x'.join(map(str, shape))} = {size:,} bytes, more than an idx "
                                f"dataset here may hold ({MAX_ARRAY_BYTES:,}); it is damaged or malicious.")
            data = handle.read(size)
    except FileNotFoundError as err:
        raise DataError(f"{path.parent} lacks {path.name}.") from err
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is a damaged idx .gz file ({err}).") from err
    if len(data) != size:
        raise DataError(f"{path} holds {len(data):,} bytes where its header declares {size:,}: it is truncated.")
    return np.frombuffer(data, np.uint8).reshape(shape)


def read_idx_folder(source: Path) -> RawDataset:
    """The four idx .gz files of (Fashion-)MNIST, as Keras stores them."""
    x_train = read_idx(source / "train-images-idx3-ubyte.gz", 3)[..., None]
    y_train = read_idx(source / "train-labels-idx1-ubyte.gz", 1).astype(np.int32)
    x_test = read_idx(source / "t10k-images-idx3-ubyte.gz", 3)[..., None]
    y_test = read_idx(source / "t10k-labels-idx1-ubyte.gz", 1).astype(np.int32)
    return RawDataset(x_train, y_train, x_test, y_test, list(FASHION_MNIST_CLASSES), "")


T10K_IMAGES = "t10k-images-idx3-ubyte.gz"
T10K_NOTE = ("MNIST answered on the 10,000 digits of its t10k test set only (the 60,000-image training set "
             "is not staged), split 80/20 into train and test, stratified and seeded; stage mnist.npz for the full set")


def read_mnist_idx(source: Path) -> RawDataset:
    """MNIST as idx .gz files; with only the t10k pair staged, its 10,000 digits are split 80/20.

    The split is stratified and seeded, so every run and worker sees the same one.
    """
    if (source / "train-images-idx3-ubyte.gz").exists():
        raw = read_idx_folder(source)
        raw.class_names = [str(i) for i in range(10)]
        return raw
    x = read_idx(source / T10K_IMAGES, 3)[..., None]
    y = read_idx(source / "t10k-labels-idx1-ubyte.gz", 1).astype(np.int32)
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} images but {len(y)} labels in the t10k files.")
    test = np.zeros(len(y), bool)
    test[stratified_sample(y, len(y) // 5, np.random.default_rng(0))] = True
    return RawDataset(x[~test], y[~test], x[test], y[test], [str(i) for i in range(10)], "", note=T10K_NOTE)


def nhwc(x: np.ndarray) -> np.ndarray:
    """Grayscale (N, H, W) gets a channel axis: (N, H, W, 1)."""
    return x[..., None] if x.ndim == 3 else x

"""The data stage: standard CIFAR-10 layout, image folders, subsets, caching, safety, offline errors."""

import io
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from cnnexp.config import compose_config
from cnnexp.data import cache, folders, formats, load, locate
from cnnexp.data.raw import subset_indices
from cnnexp.errors import ConfigError, DataError
from tests.conftest import make_cifar10_archive


def dataset_cfg(*overrides):
    return compose_config(list(overrides)).dataset


def test_cifar10_standard_archive_from_dataset_path(tmp_path):
    archive = make_cifar10_archive(tmp_path / "staged", per_batch=50)
    ds = load.load_dataset(dataset_cfg(f"dataset.path={archive}", "dataset.download=false"), val_fraction=0.2)
    assert len(ds.y_train) + len(ds.y_val) == 250 and len(ds.y_test) == 50
    assert ds.x_train.shape[1:] == (32, 32, 3) and ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0  # scaled, never raw 0-255
    assert ds.class_names[0] == "airplane"


def test_cifar10_found_in_the_keras_cache_extracted(tmp_path, monkeypatch):
    archive = make_cifar10_archive(tmp_path / "home" / "datasets", per_batch=20)
    archive.unlink()  # leave only the extracted cifar-10-batches-py/ folder
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    raw = load.load_raw(dataset_cfg("dataset.download=false", f"dataset.cache_dir={tmp_path / 'cache'}"))
    assert raw.x_train.shape == (100, 32, 32, 3) and raw.x_test.shape == (20, 32, 32, 3)


def test_decoded_data_is_cached_by_content(tmp_path, monkeypatch):
    archive = make_cifar10_archive(tmp_path / "staged", per_batch=10)
    cfg = dataset_cfg(f"dataset.path={archive}", f"dataset.cache_dir={tmp_path / 'cache'}")
    first = load.load_raw(cfg)
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1

    def must_not_decode(source):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(formats, "read_cifar10", must_not_decode)
    second = load.load_raw(cfg)
    assert np.array_equal(first.x_train, second.x_train) and first.fingerprint == second.fingerprint


def test_missing_dataset_offline_names_the_file_and_where_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("CNNEXP_SHARED_DATA", str(tmp_path / "no-shared-data"))
    monkeypatch.setattr(locate, "_online", lambda *a, **k: False)
    with pytest.raises(DataError) as err:
        load.load_raw(dataset_cfg())
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "empty" / "datasets") in message
    assert "no network" in message and "cifar10-jpeg.tar.gz" in message and "\n" not in message
    with pytest.raises(DataError, match="mnist.npz"):
        load.load_raw(dataset_cfg("dataset=mnist", "dataset.download=false"))


def test_nothing_staged_finds_the_shared_copies_and_says_so(tmp_path, monkeypatch, cifar_jpeg):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("CNNEXP_SHARED_DATA", str(cifar_jpeg.parent))
    cifar = locate.locate(dataset_cfg())
    assert (cifar.path, cifar.reader) == (cifar_jpeg, "image_tree") and "JPEG" in cifar.note
    mnist = locate.locate(dataset_cfg("dataset=mnist"))
    assert (mnist.path.name, mnist.reader) == ("mnist-t10k", "mnist_idx")
    data = load.load_dataset(dataset_cfg("dataset.train_limit=300", "dataset.test_limit=100", "dataset.eval_limit=400"))
    assert len(data.y_train) == 300 and len(data.y_val) == 400 and len(data.y_test) == 100 and data.shared_eval
    assert data.class_names[0] == "airplane" and "JPEG" in data.note and data.source == str(cifar_jpeg)
    # A standard archive in the Keras cache comes first.
    staged = make_cifar10_archive(tmp_path / "empty" / "datasets" / "build", per_batch=20)
    staged.rename(tmp_path / "empty" / "datasets" / staged.name)
    assert locate.locate(dataset_cfg()).reader == "cifar10"


def test_the_evaluation_and_test_images_stay_fixed_while_the_subset_seed_draws_another_training_subset(tmp_path):
    archive = make_cifar10_archive(tmp_path / "staged", per_batch=100)
    base = [f"dataset.path={archive}", "dataset.train_limit=200", "dataset.test_limit=50", "dataset.eval_limit=150"]
    first = load.load_dataset(dataset_cfg(*base), val_fraction=0.1, seed=7)
    other = load.load_dataset(dataset_cfg(*base, "dataset.subset_seed=5"), val_fraction=0.1, seed=8)
    assert len(first.y_train) == 200 and len(first.y_val) == 150  # no val split taken from the subset
    assert np.array_equal(first.x_val, other.x_val) and np.array_equal(first.x_test, other.x_test)
    rows = [{r.tobytes() for r in data.x_train} for data in (first, other)]
    assert rows[0] != rows[1]  # another replicate, another training subset
    assert not (rows[0] | rows[1]) & {r.tobytes() for r in first.x_val}  # never the images it is scored on
    with pytest.raises(DataError, match=r"dataset.train_limit=200: only 100 training images are left over"):
        load.load_dataset(dataset_cfg(*base[:3], "dataset.eval_limit=400"))
    with pytest.raises(DataError, match=r"dataset.eval_limit=500 leaves none of the 500"):
        load.load_dataset(dataset_cfg(f"dataset.path={archive}", "dataset.eval_limit=500", "dataset.test_limit=50"))


def test_stratified_sample_keeps_class_shares_and_is_seeded():
    y = np.repeat(np.arange(10), [500] * 5 + [100] * 5)  # ordered by class, unbalanced
    picked = load.stratified_sample(y, 300, np.random.default_rng(1))
    counts = np.bincount(y[picked], minlength=10)
    assert counts.sum() == 300 and list(counts) == [50] * 5 + [10] * 5
    assert np.array_equal(picked, load.stratified_sample(y, 300, np.random.default_rng(1)))
    assert not np.array_equal(np.sort(picked)[:50], np.arange(50))  # not "the first N"


def test_folder_loader_on_real_cifar10_images(cifar_jpeg):
    cfg = dataset_cfg("dataset=folder", f"dataset.path={cifar_jpeg}", "dataset.train_limit=1000",
                      "dataset.test_limit=200")
    ds = load.load_dataset(cfg, val_fraction=0.1, seed=0)
    assert ds.class_names == ["airplane", "automobile", "bird", "cat", "deer",
                              "dog", "frog", "horse", "ship", "truck"]
    assert len(ds.y_train) == 900 and len(ds.y_val) == 100 and len(ds.y_test) == 200
    # Stratified: the class-ordered tree still gives every class its share.
    assert set(np.bincount(ds.y_train, minlength=10)) == {90}
    assert set(np.bincount(ds.y_test, minlength=10)) == {20}
    assert ds.x_train.shape[1:] == (32, 32, 3) and 0.2 < ds.x_train.mean() < 0.7


def _png(color, size=(12, 10), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_zip_without_split_grayscale_resized(tmp_path):
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(10):
            zf.writestr(f"shapes/dark/{i}.png", _png((10, 10, 10)))
            zf.writestr(f"shapes/light/{i}.png", _png((240, 240, 240)))
    cfg = dataset_cfg("dataset=folder", f"dataset.path={archive}", "dataset.input_shape=[8,8,1]",
                      "dataset.test_fraction=0.2", f"dataset.cache_dir={tmp_path / 'cache'}")
    ds = load.load_dataset(cfg, val_fraction=0.25)
    assert ds.class_names == ["dark", "light"] and ds.input_shape == (8, 8, 1)
    assert len(ds.y_test) == 4 and set(np.bincount(ds.y_test)) == {2}
    assert ds.x_train[ds.y_train == 1].mean() > 0.9 > 0.1 > ds.x_train[ds.y_train == 0].mean()


@pytest.mark.parametrize("evil", ["../escape.png", "/abs/escape.png", "cls/../../escape.png", "..\\escape.png"])
def test_archive_members_outside_the_tree_are_refused(tmp_path, evil):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ["a/0.png", "b/0.png", evil]:
            _add(tar, name, _png((1, 2, 3)))
    with pytest.raises(DataError, match=r"Refusing to read evil.tar.gz: member .*escape.png.* absolute path or '\.\.'"):
        load.load_raw(folder_cfg(tmp_path, archive))
    assert not list(tmp_path.rglob("escape.png")) and not list((tmp_path / "cache").rglob("*.png"))


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device"])
def test_archive_links_and_devices_are_refused(tmp_path, kind):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ["a/0.png", "b/0.png"]:
            _add(tar, name, _png((1, 2, 3)))
        info = tarfile.TarInfo("a/passwd.png")
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[kind]
        info.linkname = "/etc/passwd" if kind != "device" else ""
        tar.addfile(info)
    with pytest.raises(DataError, match="member 'a/passwd.png' is a " + ("device" if kind == "device" else "link")):
        load.load_raw(folder_cfg(tmp_path, archive))


def test_zip_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/0.png", _png((1, 2, 3)))
        info = zipfile.ZipInfo("b/evil.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="member 'b/evil.png' is a link"):
        load.load_raw(folder_cfg(tmp_path, archive))


def test_too_small_a_subset_for_validation_is_a_clear_error(tmp_path):
    archive = make_cifar10_archive(tmp_path / "staged", per_batch=10)
    # Refused when the config is composed: the class count is known, so is the smallest limit that works.
    with pytest.raises(ConfigError, match=r"dataset.train_limit=20 can't give each of the 10 classes .* is 95"):
        dataset_cfg(f"dataset.path={archive}", "dataset.train_limit=20")
    # Where the class count is only known once loaded (a folder), the loader says the same in its terms.
    cfg = OmegaConf.merge(dataset_cfg(f"dataset.path={archive}"), {"train_limit": 20, "num_classes": None})
    with pytest.raises(DataError, match="train.val_fraction=0.1 of 20 training images"):
        load.load_dataset(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), 0.1)


def test_mnist_npz_and_fashion_mnist_idx_layouts(tmp_path, monkeypatch):
    import gzip

    rng = np.random.default_rng(0)
    home = tmp_path / "home" / "datasets"
    home.mkdir(parents=True)
    x_train, x_test = (rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
                       rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    y_train, y_test = np.arange(60) % 10, np.arange(20) % 10
    np.savez(home / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    fashion = home / "fashion-mnist"
    fashion.mkdir()
    for stem, array in [("train-images-idx3-ubyte", x_train), ("train-labels-idx1-ubyte", y_train),
                        ("t10k-images-idx3-ubyte", x_test), ("t10k-labels-idx1-ubyte", y_test)]:
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        with gzip.open(fashion / f"{stem}.gz", "wb") as handle:
            handle.write(header + array.astype(np.uint8).tobytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    for name in ("mnist", "fashion_mnist"):
        ds = load.load_dataset(dataset_cfg(f"dataset={name}", "dataset.download=false",
                                           f"dataset.cache_dir={tmp_path / 'cache'}"), val_fraction=0.5)
        assert ds.input_shape == (28, 28, 1) and len(ds.y_train) == 30 and len(ds.y_test) == 20
        assert np.array_equal(np.sort(ds.x_test.reshape(20, -1).sum(1)),
                              np.sort((x_test / 255).astype(np.float32).reshape(20, -1).sum(1)))


# --------------------------------------------------------------------------------------------
# Helpers for the hostile-file tests below: every file is built here, in tmp_path.


def folder_cfg(tmp_path, path, *overrides):
    return dataset_cfg("dataset=folder", f"dataset.path={path}", f"dataset.cache_dir={tmp_path / 'cache'}", *overrides)


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _noise_png(rng, size=(8, 8)):
    """Every image different, so that rows can be matched one to one."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_tree(root, classes=("a", "b", "c"), per_class=(30, 10), seed=0):
    """root/train/<class>/i.png and root/test/<class>/i.png, distinct noise images."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                (root / split / name / f"{i:03d}.png").write_bytes(_noise_png(rng))
    return root


def _tar_gz(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as the published CIFAR-10 batches (pickled by Python 2) do."""

    def save_bytes(self, obj):
        header = (pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256
                  else pickle.BINSTRING + struct.pack("<i", len(obj)))
        self.write(header + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def _batch(n=10, seed=0, style="protocol4"):
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [int(v) for v in np.arange(n) % 10]}
    if style == "python2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(batch)
        # Python 2 with numpy 1 names numpy.core.multiarray, as the published files do.
        return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return pickle.dumps(batch, protocol=5 if style == "protocol5" else 4)


def _cifar_archive(folder, batch_1, style="protocol4"):
    """cifar-10-python.tar.gz whose data_batch_1 is `batch_1` (bytes), the others ordinary."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            _add(tar, f"cifar-10-batches-py/{name}", batch_1 if name == "data_batch_1" else _batch(seed=i, style=style))
    return archive


class _RunsCommand:
    """Unpickles to os.system(...) (a command), or to eval of an expression that runs one and returns a batch."""

    def __init__(self, marker, via):
        self.marker, self.via = marker, via

    def __reduce__(self):
        command = f"touch {self.marker}"
        if self.via == "system":
            return os.system, (command,)
        return eval, (f"(__import__('os').system({command!r}), {{b'data': __import__('numpy').zeros((10, 3072), "
                      f"'uint8'), b'labels': [0] * 10}})[1]",)


# --------------------------------------------------------------------------------------------
# 1. CIFAR-10 batches are pickles: only numpy arrays and plain containers may come out of them


@pytest.mark.parametrize("where", ["dataset.path", "keras_home"])
@pytest.mark.parametrize(("via", "refused"), [("system", "posix.system"), ("eval", "builtins.eval")])
def test_cifar10_batch_that_runs_a_command_is_refused(tmp_path, monkeypatch, where, via, refused):
    marker = tmp_path / "command-ran"
    staged = tmp_path / "home" / "datasets" if where == "keras_home" else tmp_path / "staged"
    archive = _cifar_archive(staged, pickle.dumps(_RunsCommand(marker, via)))
    overrides = [f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.download=false"]
    if where == "keras_home":
        monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    else:
        overrides.append(f"dataset.path={archive}")
    with pytest.raises(DataError) as err:
        load.load_dataset(dataset_cfg(*overrides))
    assert str(err.value).startswith(f"Refusing to load {archive}:data_batch_1: it asks to run {refused}, "
                                     "which a CIFAR-10 batch never does;")
    assert "\n" not in str(err.value)
    assert not marker.exists()  # the command never ran
    assert not list((tmp_path / "cache").glob("*.npz"))


@pytest.mark.parametrize("style", ["python2", "protocol4", "protocol5"])
def test_cifar10_batches_as_python2_numpy1_and_numpy2_write_them_load(tmp_path, style):
    archive = _cifar_archive(tmp_path / "staged", _batch(seed=9, style=style), style=style)
    raw = load.load_raw(dataset_cfg(f"dataset.path={archive}", f"dataset.cache_dir={tmp_path / 'cache'}"))
    assert raw.x_train.shape == (50, 32, 32, 3) and raw.y_test.tolist() == list(range(10))
    expected = np.random.default_rng(9).integers(0, 256, (10, 3072), dtype=np.uint8)
    assert np.array_equal(raw.x_train[:10], expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.parametrize(("batch", "why"), [
    ([1, 2, 3], "found list"),
    ({b"data": np.zeros((10, 3072), np.uint8)}, "b'labels' should be a list of ints"),
    ({b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}, r"shape \(N, 3072\)"),
    ({b"data": np.zeros((10, 3072), np.float32), b"labels": [0] * 10}, r"shape \(N, 3072\)"),
    ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [10] * 10}, r"10 labels in 10..10 for 10 images"),
    ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}, r"9 labels"),
    (b"\x80\x04not a pickle", "not a readable CIFAR-10 batch"),
])
def test_cifar10_batch_of_the_wrong_structure_is_refused(tmp_path, batch, why):
    blob = batch if isinstance(batch, bytes) else pickle.dumps(batch)
    archive = _cifar_archive(tmp_path / "staged", blob)
    with pytest.raises(DataError, match=f"data_batch_1 .*{why}"):
        load.load_raw(dataset_cfg(f"dataset.path={archive}", f"dataset.cache_dir={tmp_path / 'cache'}"))


# --------------------------------------------------------------------------------------------
# 2 and 7. The decode cache: damaged, wrong or unwritable means a warning and a rebuild, never a traceback


@pytest.fixture
def small_tree(tmp_path):
    return _tar_gz(_image_tree(tmp_path / "tree" / "shapes"), tmp_path / "shapes.tar.gz")


def _data_cache_file(tmp_path):
    (found,) = [p for p in (tmp_path / "cache").glob("folder-v*.npz") if not p.name.endswith("-files.npz")]
    return found


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_cache_is_rebuilt_with_one_warning(tmp_path, small_tree, caplog, damage):
    cfg = folder_cfg(tmp_path, small_tree)
    first = load.load_raw(cfg)
    cached = _data_cache_file(tmp_path)
    blob = bytearray(cached.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0x10
    else:
        blob = bytearray(b"not a zip at all")
    cached.write_bytes(bytes(blob))
    caplog.clear()
    again = load.load_raw(cfg)
    assert np.array_equal(again.x_train, first.x_train) and np.array_equal(again.y_test, first.y_test)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(cached) in warnings[0] and "rebuilding it" in warnings[0], warnings
    caplog.clear()
    load.load_raw(cfg)  # the rebuilt file is whole again
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_damaged_cifar10_cache_is_rebuilt(tmp_path, caplog):
    archive = make_cifar10_archive(tmp_path / "staged", per_batch=10)
    cfg = dataset_cfg(f"dataset.path={archive}", f"dataset.cache_dir={tmp_path / 'cache'}")
    first = load.load_raw(cfg)
    (cached,) = (tmp_path / "cache").glob("cifar10-*.npz")
    cached.write_bytes(cached.read_bytes()[:1000])
    assert np.array_equal(load.load_raw(cfg).x_train, first.x_train)
    assert any(str(cached) in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("tamper", "why"), [
    (lambda a: {**a, "x_train": np.zeros_like(a["x_train"]), "x_test": np.zeros_like(a["x_test"])}, "every pixel is 0"),
    (lambda a: {**a, "y_train": a["y_train"] + 5}, "labels span"),
    (lambda a: {**a, "x_train": a["x_train"][:, :4], "x_test": a["x_test"][:, :4]}, "not uint8"),
    (lambda a: {**a, "y_train": np.minimum(a["y_train"], 1), "y_test": np.minimum(a["y_test"], 1)},
     "class 'c' has no images"),
    (lambda a: {**a, "x_train": a["x_train"][:-5], "y_train": a["y_train"][:-5]}, "the source lists 90"),
])
def test_valid_cache_with_the_wrong_data_is_rebuilt(tmp_path, small_tree, caplog, tamper, why):
    cfg = folder_cfg(tmp_path, small_tree)
    first = load.load_raw(cfg)
    cached = _data_cache_file(tmp_path)
    with np.load(cached, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("__")}
        source = str(z["__source__"])
    cache.DecodeCache(tmp_path / "cache").put(cached.stem, tamper(arrays), source)  # checksum and all: valid
    caplog.clear()
    again = load.load_raw(cfg)
    assert np.array_equal(again.x_train, first.x_train) and np.array_equal(again.y_train, first.y_train)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "describes the wrong data" in warnings[0] and why in warnings[0], warnings


def test_unwritable_cache_folder_warns_once_and_decodes(tmp_path, small_tree, caplog):
    (tmp_path / "not-a-folder").write_text("a file where the cache folder's parent should be")
    cfg = folder_cfg(tmp_path, small_tree, f"dataset.cache_dir={tmp_path / 'not-a-folder' / 'cache'}")
    first, second = load.load_raw(cfg), load.load_raw(cfg)
    assert len(first.y_train) == 90 and np.array_equal(first.x_train, second.x_train)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"cannot write the decode cache in {tmp_path / 'not-a-folder' / 'cache'}: ")
    assert warnings[0].endswith("; decoding each time.")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_warns_and_decodes(tmp_path, small_tree, caplog):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o500)
    try:
        raw = load.load_raw(folder_cfg(tmp_path, small_tree))
    finally:
        (tmp_path / "cache").chmod(0o700)
    assert len(raw.y_train) == 90
    assert any(r.getMessage().startswith("cannot write the decode cache in") for r in caplog.records)


# --------------------------------------------------------------------------------------------
# 3. Leftovers of killed runs are removed, another live process's files never


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path, small_tree):
    folder = tmp_path / "cache"
    (folder / "extracted").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    day_ago = time.time() - 2 * 24 * 3600
    files = {
        f"folder-v2-x~{host}~{dead.pid}~ab12.npz.tmp": False,       # killed here: removed
        f"folder-v2-x~{host}~{os.getpid()}~cd34.npz.tmp": True,     # this (live) process: kept
        f"folder-v2-x~other-host~{dead.pid}~ef56.npz.tmp": True,    # another machine's: kept (for a day)
        "tmpq1w2e3.npz.tmp": True,                                  # an older version's, recent: kept
        "tmpold.npz.tmp": False,                                    # an older version's, two days old
    }
    for name in files:
        (folder / name).write_bytes(b"half")
    os.utime(folder / "tmpold.npz.tmp", (day_ago, day_ago))
    load.load_raw(folder_cfg(tmp_path, small_tree))
    for name, kept in files.items():
        assert (folder / name).exists() == kept, name
    assert len(list(folder.glob("*.npz.tmp"))) == 3  # and this run's own temporaries were renamed into place


# --------------------------------------------------------------------------------------------
# 4. Archives are decoded in memory; a subset decodes only its own images


def test_archive_is_decoded_in_memory_with_a_progress_bar(tmp_path, small_tree, capfd, caplog, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # the bar shows on a terminal
    with caplog.at_level("INFO"):
        raw = load.load_raw(folder_cfg(tmp_path, small_tree))
    assert raw.class_names == ["a", "b", "c"] and len(raw.y_train) == 90 and len(raw.y_test) == 30
    assert f"Decoding {small_tree.name}" in capfd.readouterr().err
    assert "Decoded 120 images" in caplog.text  # what a log file gets instead of the bar
    written = [p for p in tmp_path.rglob("*") if p.is_file() and tmp_path / "tree" not in p.parents]
    assert sorted(p.suffix for p in written) == [".gz", ".npz", ".npz"]  # the archive, the listing, the arrays


def test_subset_decodes_only_its_images_and_equals_sampling_the_full_decode(tmp_path, small_tree, monkeypatch):
    decoded = []
    real_decode_one = folders._decode_one
    monkeypatch.setattr(folders, "_decode_one", lambda blob, *a: decoded.append(1) or real_decode_one(blob, *a))
    cfg = folder_cfg(tmp_path, small_tree, "dataset.train_limit=30", "dataset.test_limit=12", "dataset.subset_seed=3")
    subset = load.load_dataset(cfg, val_fraction=0.2, seed=1)
    assert len(decoded) == 42  # of 120
    assert list((tmp_path / "cache").glob("folder-v*-train30-test12-evalNone-seed3.npz"))
    assert len(subset.y_train) + len(subset.y_val) == 30 and np.bincount(subset.y_test).tolist() == [4, 4, 4]

    # What sampling the full decode gives (the path of every other source): the same rows, in the same order.
    full = load.load_raw(folder_cfg(tmp_path, small_tree))
    assert len(decoded) == 42 + 120
    rows = subset_indices(full.y_train, full.y_test, cfg)
    picked = load._subset(cfg, locate.locate(cfg))
    assert (np.array_equal(picked.x_train, full.x_train[rows.train])
            and np.array_equal(picked.y_train, full.y_train[rows.train]))
    assert (np.array_equal(picked.x_test, full.x_test[rows.test])
            and np.array_equal(picked.y_test, full.y_test[rows.test]))
    assert np.array_equal(subset.x_test, picked.x_test.astype(np.float32) / 255)

    decoded.clear()  # and the cached subset is not decoded again
    again = load.load_dataset(cfg, val_fraction=0.2, seed=1)
    assert not decoded and np.array_equal(again.x_train, subset.x_train)


# --------------------------------------------------------------------------------------------
# 5 and 6. Bad images and empty class folders


def _bad_images_tree(root):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(100):
            (root / name / f"{i:03d}.png").write_bytes(_png((40 + i, 90, 200 if name == "a" else 20)))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "random.jpg").write_bytes(rng.bytes(5000))
    # A decompression bomb: a PNG header claiming 20000x20000 pixels (only the header is ever read).
    png = bytearray(_png((0, 0, 0), size=(1, 1)))
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (root / "b" / "bomb.png").write_bytes(bytes(png))
    return root


def test_too_many_bad_images_refuse_the_dataset_naming_them(tmp_path):
    tree = _bad_images_tree(tmp_path / "photos")
    with pytest.raises(DataError) as err:
        load.load_raw(folder_cfg(tmp_path, tree))
    message = str(err.value)
    assert message.startswith(f"4 of 204 images in {tree} are unreadable (2.0%, over dataset.max_bad_fraction=0.01): ")
    for expected in ("a/truncated.jpg (", "a/empty.jpg (empty file (0 bytes))", "b/random.jpg (not an image",
                     "b/bomb.png (20000x20000 exceeds dataset.max_image_pixels (16777216))"):
        assert expected in message, message
    assert "\n" not in message


def test_a_few_bad_images_are_skipped_with_one_warning(tmp_path, caplog):
    tree = _bad_images_tree(tmp_path / "photos")
    cfg = folder_cfg(tmp_path, tree, "dataset.max_bad_fraction=0.05", "dataset.test_fraction=0.1")
    raw = load.load_raw(cfg)
    assert len(raw.y_train) + len(raw.y_test) == 200 and sorted(raw.skipped) == [
        "a/empty.jpg", "a/truncated.jpg", "b/bomb.png", "b/random.jpg"]
    assert raw.x_train.reshape(len(raw.y_train), -1).any(axis=1).all()  # no placeholder rows
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"Skipped 4 unreadable image(s) of 204 in {tree}: "), warnings
    caplog.clear()
    assert np.array_equal(load.load_raw(cfg).x_train, raw.x_train)  # from the cache: the same warning again
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == warnings


def test_image_over_max_image_pixels_is_bad_before_decoding(tmp_path):
    tree = _image_tree(tmp_path / "t", per_class=(3, 1))
    (tree / "train" / "a" / "big.png").write_bytes(_png((1, 2, 3), size=(64, 64)))
    with pytest.raises(DataError, match=r"train/a/big.png \(64x64 exceeds dataset.max_image_pixels \(1000\)\)"):
        load.load_raw(folder_cfg(tmp_path, tree, "dataset.max_image_pixels=1000"))


@pytest.mark.parametrize("as_archive", [False, True])
def test_empty_class_folder_is_refused(tmp_path, as_archive):
    tree = _image_tree(tmp_path / "t" / "pets", per_class=(3, 1))
    (tree / "train" / "zebra").mkdir()
    source = _tar_gz(tree, tmp_path / "pets.tar.gz") if as_archive else tree
    where = f"{source}:pets/train/zebra/" if as_archive else f"{tree}/train/zebra/"
    wanted = re.escape(f"Class folder {where} holds no images (") + ".*remove it or add images"
    with pytest.raises(DataError, match=wanted):
        load.load_raw(folder_cfg(tmp_path, source))


def test_no_pickle_or_yaml_load_anywhere_in_the_package():
    from cnnexp import PROJECT_ROOT

    modules = sorted((PROJECT_ROOT / "cnnexp").rglob("*.py"))
    assert len(modules) > 25
    for module in modules:
        text = module.read_text()
        assert not re.search(r"pickle\.loads?\(|allow_pickle=True|yaml\.load\(", text), module
        assert all("allow_pickle=False" in line for line in text.splitlines() if "np.load(" in line), module

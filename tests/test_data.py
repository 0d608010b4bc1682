"""The data stage: standard CIFAR-10 layout, image folders, subsets, caching, safety, offline errors."""

import io
import tarfile
import zipfile

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from cnnexp import data
from cnnexp.config import compose_config
from tests.conftest import make_cifar10_archive


def dataset_cfg(*overrides):
    return compose_config(list(overrides)).dataset


def test_cifar10_standard_archive_from_dataset_path(tmp_path):
    archive = make_cifar10_archive(tmp_path / "staged", per_batch=50)
    ds = data.load_dataset(dataset_cfg(f"dataset.path={archive}", "dataset.download=false"), val_fraction=0.2)
    assert len(ds.y_train) + len(ds.y_val) == 250 and len(ds.y_test) == 50
    assert ds.x_train.shape[1:] == (32, 32, 3) and ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0  # scaled, never raw 0-255
    assert ds.class_names[0] == "airplane"


def test_cifar10_found_in_the_keras_cache_extracted(tmp_path, monkeypatch):
    archive = make_cifar10_archive(tmp_path / "home" / "datasets", per_batch=20)
    archive.unlink()  # leave only the extracted cifar-10-batches-py/ folder
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    raw = data.load_raw(dataset_cfg("dataset.download=false", f"dataset.cache_dir={tmp_path / 'cache'}"))
    assert raw.x_train.shape == (100, 32, 32, 3) and raw.x_test.shape == (20, 32, 32, 3)


def test_decoded_data_is_cached_by_content(tmp_path, monkeypatch):
    archive = make_cifar10_archive(tmp_path / "staged", per_batch=10)
    cfg = dataset_cfg(f"dataset.path={archive}", f"dataset.cache_dir={tmp_path / 'cache'}")
    first = data.load_raw(cfg)
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1

    def must_not_decode(source):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_read_cifar10", must_not_decode)
    second = data.load_raw(cfg)
    assert np.array_equal(first.x_train, second.x_train) and first.fingerprint == second.fingerprint


def test_missing_dataset_offline_names_the_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "_online", lambda *a, **k: False)
    with pytest.raises(data.DataError) as err:
        data.load_raw(dataset_cfg())
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "empty" / "datasets") in message
    assert "no network" in message
    with pytest.raises(data.DataError, match="mnist.npz"):
        data.load_raw(dataset_cfg("dataset=mnist", "dataset.download=false"))


def test_stratified_sample_keeps_class_shares_and_is_seeded():
    y = np.repeat(np.arange(10), [500] * 5 + [100] * 5)  # ordered by class, unbalanced
    picked = data.stratified_sample(y, 300, np.random.default_rng(1))
    counts = np.bincount(y[picked], minlength=10)
    assert counts.sum() == 300 and list(counts) == [50] * 5 + [10] * 5
    assert np.array_equal(picked, data.stratified_sample(y, 300, np.random.default_rng(1)))
    assert not np.array_equal(np.sort(picked)[:50], np.arange(50))  # not "the first N"


def test_folder_loader_on_real_cifar10_images(cifar_jpeg):
    cfg = dataset_cfg("dataset=folder", f"dataset.path={cifar_jpeg}", "dataset.train_limit=1000",
                      "dataset.test_limit=200")
    ds = data.load_dataset(cfg, val_fraction=0.1, seed=0)
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
    ds = data.load_dataset(cfg, val_fraction=0.25)
    assert ds.class_names == ["dark", "light"] and ds.input_shape == (8, 8, 1)
    assert len(ds.y_test) == 4 and set(np.bincount(ds.y_test)) == {2}
    assert ds.x_train[ds.y_train == 1].mean() > 0.9 > 0.1 > ds.x_train[ds.y_train == 0].mean()


@pytest.mark.parametrize("evil", ["../escape.png", "/abs/escape.png", "cls/../../escape.png"])
def test_archive_members_outside_the_target_are_refused(tmp_path, evil):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ["cls/a.png", evil]:
            payload = _png((1, 2, 3))
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    target = tmp_path / "out" / "x"
    with pytest.raises(data.DataError, match="would land outside the target folder"):
        data.safe_extract(archive, target)
    assert not target.exists() and not (tmp_path / "escape.png").exists()
    assert not list((tmp_path / "out").rglob("*.png"))


def test_archive_links_are_refused(tmp_path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("cls/passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(data.DataError, match="is a link"):
        data.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_small_a_subset_for_validation_is_a_clear_error(tmp_path):
    archive = make_cifar10_archive(tmp_path / "staged", per_batch=10)
    cfg = dataset_cfg(f"dataset.path={archive}", "dataset.train_limit=20")
    with pytest.raises(data.DataError, match="train.val_fraction=0.1 of 20 training images"):
        data.load_dataset(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), 0.1)


def test_mnist_npz_and_fashion_mnist_idx_layouts(tmp_path, monkeypatch):
    import gzip

    rng = np.random.default_rng(0)
    home = tmp_path / "home" / "datasets"
    home.mkdir(parents=True)
    x_train, x_test = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    y_train, y_test = np.arange(60) % 10, np.arange(20) % 10
    np.savez(home / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    fashion = home / "fashion-mnist"
    fashion.mkdir()
    for stem, header, array in [("train-images-idx3-ubyte", 16, x_train), ("train-labels-idx1-ubyte", 8, y_train),
                                ("t10k-images-idx3-ubyte", 16, x_test), ("t10k-labels-idx1-ubyte", 8, y_test)]:
        with gzip.open(fashion / f"{stem}.gz", "wb") as handle:
            handle.write(b"\0" * header + array.astype(np.uint8).tobytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    for name in ("mnist", "fashion_mnist"):
        ds = data.load_dataset(dataset_cfg(f"dataset={name}", "dataset.download=false",
                                           f"dataset.cache_dir={tmp_path / 'cache'}"), val_fraction=0.5)
        assert ds.input_shape == (28, 28, 1) and len(ds.y_train) == 30 and len(ds.y_test) == 20
        assert np.array_equal(np.sort(ds.x_test.reshape(20, -1).sum(1)),
                              np.sort((x_test / 255).astype(np.float32).reshape(20, -1).sum(1)))

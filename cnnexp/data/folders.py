"""Image-folder datasets: one sub-folder per class, as a directory or a .tar(.gz/.bz2/.xz) / .zip of one.

Layout: `train/` and `test/` sub-folders are used when present, else a seeded stratified split
(`dataset.test_fraction`). A lone top-level folder (as archives usually wrap their tree) is stepped
into; hidden files and `__MACOSX/` are ignored. Images are resized to `dataset.input_shape`.

Promises:
- Archives are read in memory (`cnnexp.archives`): members are decoded from bytes, nothing is
  written to disk. Still, before any image is decoded, a member with an absolute path or '..'
  parts, a link or a device is refused with a DataError naming it.
- An empty class folder is refused (DataError naming it), never counted as a class.
- With `dataset.train_limit`/`test_limit` only the images of the stratified, seeded subset are
  decoded and cached under a key holding the selection: the same rows, in the same order, as
  sampling the full decode (the selection is drawn over the listed files; a bad one is then dropped).
- The file listing and the decoded arrays are cached (`cnnexp.cache`); a cache that does not hold
  exactly the labels the listing gives is rebuilt.

Bad images (truncated, empty, not an image, or over `dataset.max_image_pixels` by their header,
checked before decoding): skipped, with ONE warning that counts them and names up to 5 with the
reason. When more than `dataset.max_bad_fraction` of the images are bad, the dataset is refused
with a DataError naming them. Never a traceback.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cnnexp.data.archives import Tree, open_tree
from cnnexp.data.cache import CACHE_VERSION, DecodeCache
from cnnexp.data.raw import RawDataset, Rows, problem, stratified_sample, subset_indices
from cnnexp.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_MAX_BAD_FRACTION = 0.01        # defaults of conf/dataset/folder.yaml, for configs made elsewhere
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
_SHOWN = 5  # bad files named in a message


def load(source: Path, dataset_cfg, digest: str, cache: DecodeCache, subset: bool = False) -> RawDataset:
    """Decode the tree at `source` (whole, or only the `subset_indices` rows), from the cache when intact."""
    shape = input_shape(dataset_cfg)
    max_pixels = int(dataset_cfg.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    max_bad = float(dataset_cfg.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION))
    test_fraction = float(dataset_cfg.get("test_fraction", 0.2))  # unused by trees with train/ and test/
    if not 0 <= max_bad <= 1 or max_pixels < 1:
        raise DataError(f"dataset.max_bad_fraction={max_bad} must be in [0, 1] and dataset.max_image_pixels="
                        f"{max_pixels} at least 1.")
    with open_tree(source) as tree:
        listed = _cached_listing(tree, digest, cache, test_fraction)
        y_train, y_test = listed["y_train"], listed["y_test"]
        rows = (subset_indices(y_train, y_test, dataset_cfg) if subset
                else Rows(np.arange(len(y_train)), np.array([], int), np.arange(len(y_test))))
        # Decoded in three groups: the training subset, the test subset, the evaluation set.
        groups = [(listed["train_files"], y_train, rows.train), (listed["test_files"], y_test, rows.test),
                  (listed["train_files"], y_train, rows.eval)]
        names = [[str(n) for n in files[idx]] for files, _, idx in groups]
        labels = [y[idx] for _, y, idx in groups]
        class_names = [str(c) for c in listed["class_names"]]
        total = sum(len(n) for n in names)
        selection = (f"-train{dataset_cfg.train_limit}-test{dataset_cfg.test_limit}-eval{dataset_cfg.get('eval_limit')}"
                     f"-seed{dataset_cfg.subset_seed}" if subset else "")
        key = f"folder-v{CACHE_VERSION}-{digest[:20]}-{'x'.join(map(str, shape))}-{test_fraction}-px{max_pixels}"
        decoded_now = []

        def build() -> dict[str, np.ndarray]:
            x, skipped = _decode(tree, [n for group in names for n in group], shape, max_pixels)
            keep = [np.array([n not in skipped for n in group], bool) for group in names]
            ends = np.cumsum([k.sum() for k in keep])
            raw = RawDataset(x[: ends[0]], labels[0][keep[0]], x[ends[0]: ends[1]], labels[1][keep[1]],
                             class_names, digest, skipped, x_eval=x[ends[1]:], y_eval=labels[2][keep[2]])
            _report_bad(skipped, total, source, max_bad)
            decoded_now.append(True)
            why = problem(raw, shape, complete=not subset)
            if why:
                raise DataError(f"{source} does not give a usable dataset: {why}.")
            return raw.to_arrays()

        def check(arrays: dict[str, np.ndarray]) -> str | None:
            raw = RawDataset.from_arrays(arrays, digest)
            if raw.class_names != class_names:
                return f"classes {raw.class_names} where the source has {class_names}"
            expected = tuple(y[[n not in raw.skipped for n in group]] for y, group in zip(labels, names))
            return problem(raw, shape, complete=not subset, expected=expected)

        raw = RawDataset.from_arrays(cache.get_or_build(key + selection, digest, build, check), digest)
    if not decoded_now:
        _report_bad(raw.skipped, total, source, max_bad)  # the same warning (or refusal) as when decoded
    return raw


def input_shape(dataset_cfg) -> tuple[int, int, int]:
    height, width, channels = (int(v) for v in dataset_cfg.input_shape)
    if channels not in (1, 3) or height < 1 or width < 1:
        raise DataError(
            f"dataset.input_shape={list(dataset_cfg.input_shape)} must be [height, width, 1 or 3]."
        )
    return height, width, channels


# --------------------------------------------------------------------------------------------
# Listing: which files are images of which class, in which split


def _cached_listing(tree: Tree, digest: str, cache: DecodeCache, test_fraction: float) -> dict[str, np.ndarray]:
    def build() -> dict[str, np.ndarray]:
        return _listing(tree, test_fraction)

    def check(listed: dict[str, np.ndarray]) -> str | None:
        n_classes = len(listed["class_names"])
        for split in ("train", "test"):
            y, files = listed[f"y_{split}"], listed[f"{split}_files"]
            if len(y) != len(files) or (len(y) and (y.min() < 0 or y.max() >= n_classes)):
                return f"{len(files)} {split} files with labels that do not fit {n_classes} classes"
        return None

    return cache.get_or_build(f"folder-v{CACHE_VERSION}-{digest[:20]}-{test_fraction}-files", digest, build, check)


def _listing(tree: Tree, test_fraction: float) -> dict[str, np.ndarray]:
    files = [p for p in (tuple(n.split("/")) for n in tree.files()) if not _ignored(p)]
    folders = {p[:i] for p in files for i in range(1, len(p))}
    folders |= {p for p in (tuple(n.split("/")) for n in tree.folders()) if not _ignored(p)}

    def subfolders(prefix: tuple[str, ...]) -> list[str]:
        n = len(prefix)
        return sorted({p[n] for p in folders if len(p) > n and p[:n] == prefix})

    root: tuple[str, ...] = ()
    while True:  # step into a lone top-level folder
        entries = subfolders(root) + [p[-1] for p in files if p[:-1] == root]
        if len(entries) != 1 or entries[0] not in subfolders(root) or entries[0] in ("train", "test"):
            break
        root += (entries[0],)
    images = [p for p in files if os.path.splitext(p[-1])[1].lower() in IMAGE_SUFFIXES]

    def split_of(base: tuple[str, ...], class_names: list[str] | None = None) -> tuple[list[str], list[str], list]:
        names = subfolders(base) if class_names is None else class_names
        extra = sorted(set(subfolders(base)) - set(names))
        if extra:
            raise DataError(f"{tree.where('/'.join(base))}/ has class folders that train/ lacks: {extra}; "
                            "give both splits the same classes.")
        if len(names) < 2:
            raise DataError(f"{tree.where('/'.join(base))} should hold one sub-folder per class (at least two); "
                            f"found {names or 'none'}.")
        n = len(base)
        by_class: dict[str, list[tuple[str, ...]]] = {}
        for p in images:
            if len(p) > n + 1 and p[:n] == base:
                by_class.setdefault(p[n], []).append(p)
        for name in names:
            if name in subfolders(base) and not by_class.get(name):
                raise DataError(f"Class folder {tree.where('/'.join(base + (name,)))}/ holds no images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add images.")
        found = [(sorted(by_class.get(name, [])), index) for index, name in enumerate(names)]
        return names, ["/".join(p) for group, _ in found for p in group], [i for group, i in found for _ in group]

    if {"train", "test"} <= set(subfolders(root)):
        class_names, train_files, y_train = split_of(root + ("train",))
        _, test_files, y_test = split_of(root + ("test",), class_names)
    else:
        class_names, all_files, labels = split_of(root)
        labels = np.asarray(labels, np.int32)
        n_test = int(round(len(labels) * test_fraction))
        if not 0 < n_test < len(labels):  # evaluation after training would fail on an empty split
            raise DataError(f"dataset.test_fraction={test_fraction} of the {len(labels)} images in "
                            f"{tree.where('/'.join(root))} leaves "
                            f"{'no test' if n_test == 0 else 'no training'} image; change it, or give the tree "
                            "train/ and test/ folders.")
        is_test = np.zeros(len(labels), bool)
        is_test[stratified_sample(labels, n_test, np.random.default_rng(0))] = True
        train_files, test_files = ([f for f, t in zip(all_files, is_test) if t == want] for want in (False, True))
        y_train, y_test = labels[~is_test], labels[is_test]
    return {"class_names": np.array(class_names, dtype=str),
            "train_files": np.array(train_files, dtype=str), "y_train": np.asarray(y_train, np.int32),
            "test_files": np.array(test_files, dtype=str), "y_test": np.asarray(y_test, np.int32)}


def _ignored(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


# --------------------------------------------------------------------------------------------
# Decoding, from bytes


def _decode(tree: Tree, names: list[str], shape: tuple[int, int, int], max_pixels: int):
    """Images in the order of `names`, plus {name: why} for those that could not be used."""
    height, width, channels = shape
    row = {name: i for i, name in enumerate(names)}
    out = np.zeros((len(names), height, width, channels), np.uint8)
    skipped: dict[str, str] = {}
    began = time.perf_counter()
    # One thread: for small images the per-image Python work dominates and threads measured slower.
    with (tqdm(total=len(names), desc=f"Decoding {tree.path.name}", unit="img", leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty()) as bar,  # a log file gets the "Decoded N images" line
          warnings.catch_warnings()):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # dataset.max_image_pixels decides
        for name, blob in tree.read(names):
            pixels = _decode_one(blob, width, height, "RGB" if channels == 3 else "L", max_pixels)
            if isinstance(pixels, str):
                skipped[name] = pixels
            else:
                out[row[name]] = pixels.reshape(height, width, channels)
            bar.update()
    log.info("Decoded %d images from %s in %.1f s (%d unreadable, skipped)",
             len(names) - len(skipped), tree.path, time.perf_counter() - began, len(skipped))
    if skipped:
        out = out[[name not in skipped for name in names]]
    return out, {name: skipped[name] for name in names if name in skipped}


def _decode_one(blob: bytes | str, width: int, height: int, mode: str, max_pixels: int) -> np.ndarray | str:
    """The resized pixels, or why the image cannot be used (a read error arrives as a string)."""
    if isinstance(blob, str):
        return blob
    if not blob:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(blob)) as image:
            if image.width * image.height > max_pixels:  # from the header: nothing decoded yet
                return f"{image.width}x{image.height} exceeds dataset.max_image_pixels ({max_pixels})"
            image = _eight_bit(image)
            if isinstance(image, str):
                return image
            image = image.convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(image, np.uint8)
    except Image.DecompressionBombError:  # over Pillow's own limit: refused before our check could run
        size = _header_size(blob)
        return (f"{size[0]}x{size[1]} exceeds dataset.max_image_pixels ({max_pixels})" if size
                else "exceeds Pillow's decompression-bomb limit")
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except Exception as err:  # truncated or damaged: Pillow raises OSError, ValueError, SyntaxError, ...
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'damaged'}"[:120]


def _eight_bit(image: Image.Image) -> Image.Image | str:
    """16- and 32-bit integer pixels scaled to 8 bits (Pillow's `convert` would clip them to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image, dtype=np.int64)
        top = 65535 if image.mode.startswith("I;16") or pixels.max() > 255 else 255
        if pixels.min() < 0 or pixels.max() > 65535:
            return f"{image.mode} pixels span {pixels.min()}..{pixels.max()}: not a 16-bit image"
        return Image.fromarray(np.round(pixels * (255 / top)).astype(np.uint8), "L")
    if image.mode == "F":
        return "floating-point pixels (mode F) have no known range"
    return image


def _header_size(blob: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone, without Pillow's bomb check (which hides them)."""
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        accepted = not accept or accept(blob[:16])
        if accepted and not isinstance(accepted, str):
            try:
                return factory(io.BytesIO(blob), "").size
            except Exception:  # not this format; try the next
                continue
    return None


def _report_bad(skipped: dict[str, str], total: int, source: Path, max_bad: float) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{name} ({why})" for name, why in list(skipped.items())[:_SHOWN])
    if len(skipped) > _SHOWN:
        shown += f"; and {len(skipped) - _SHOWN} more"
    if len(skipped) > max_bad * total:
        raise DataError(f"{len(skipped)} of {total} images in {source} are unreadable "
                        f"({len(skipped) / total:.1%}, over dataset.max_bad_fraction={max_bad}): {shown}. "
                        "Fix or remove them, or raise dataset.max_bad_fraction.")
    log.warning("Skipped %d unreadable image(s) of %d in %s: %s", len(skipped), total, source, shown)

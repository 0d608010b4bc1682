"""Decoded datasets as plain arrays, the checks every decoded dataset passes, and seeded subsets.

Promises: a `RawDataset` holds uint8 images (N, H, W, C) and int32 labels in [0, classes), with
the source's own train/test split; `problem` says in a few words why arrays cannot be the dataset
they claim to be (wrong shape, labels out of range, an empty class, all-black pixels, the wrong
labels for the source), so a stale or tampered cache is rebuilt instead of trained on.
Subsets are stratified and seeded, never "the first N".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cnnexp.errors import DataError


@dataclass
class RawDataset:
    """Decoded, unscaled images (uint8) with the original train/test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    fingerprint: str
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable image -> why (image folders only)
    note: str = ""  # what the user must know about where the data came from (e.g. MNIST from t10k only)
    # A fixed evaluation set drawn from training images the subset does not use (dataset.eval_limit).
    x_eval: np.ndarray | None = None
    y_eval: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no objects), so that the cache never needs pickle."""
        return {
            "x_train": self.x_train, "y_train": self.y_train, "x_test": self.x_test, "y_test": self.y_test,
            "class_names": np.array(self.class_names, dtype=str),
            "skipped_files": np.array(list(self.skipped), dtype=str),
            "skipped_reasons": np.array(list(self.skipped.values()), dtype=str),
            **({"x_eval": self.x_eval, "y_eval": self.y_eval} if self.y_eval is not None else {}),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], fingerprint: str) -> RawDataset:
        return cls(
            arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
            [str(c) for c in arrays["class_names"]], fingerprint,
            dict(zip(map(str, arrays["skipped_files"]), map(str, arrays["skipped_reasons"]))),
            x_eval=arrays.get("x_eval"), y_eval=arrays.get("y_eval"),
        )


def problem(raw: RawDataset, input_shape: tuple[int, int, int], complete: bool = True,
            expected: tuple[np.ndarray, np.ndarray] | None = None) -> str | None:
    """Why `raw` cannot be the dataset it claims to be, in a few words; None when it can.

    Args:
        raw: decoded arrays, fresh or from the cache.
        input_shape: the (height, width, channels) every image must have.
        complete: the whole dataset, so every class must have at least one image.
        expected: the labels the source lists for (train, test[, eval]), when known.
    """
    splits = [("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)]
    if raw.y_eval is not None:
        splits.append(("eval", raw.x_eval, raw.y_eval))
    for split, x, y in splits:
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
            return f"{split} images are {x.dtype} {tuple(x.shape)}, not uint8 (N, {', '.join(map(str, input_shape))})"
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            return f"{len(x)} {split} images but {y.dtype} labels of shape {tuple(y.shape)}"
        if len(y) and (y.min() < 0 or y.max() >= len(raw.class_names)):
            return f"{split} labels span {y.min()}..{y.max()} for {len(raw.class_names)} classes"
    if len(raw.y_train) == 0 or len(raw.y_test) == 0:
        return f"no {'training' if len(raw.y_train) == 0 else 'test'} images"
    if not (raw.x_train.any() or raw.x_test.any()):
        return "every pixel is 0"
    if complete:
        counts = np.bincount(np.concatenate([raw.y_train, raw.y_test]), minlength=len(raw.class_names))
        if (counts == 0).any():
            return f"class {raw.class_names[int(np.argmin(counts))]!r} has no images"
    if expected is not None:
        for split, y, want in zip(("train", "test", "eval"), (raw.y_train, raw.y_test, raw.y_eval), expected):
            if not np.array_equal(y, want):
                return f"{len(y)} {split} labels where the source lists {len(want)} (or other labels)"
    return None


def smallest_limit(classes: int, val_fraction: float, shared_eval: bool) -> int:
    """The smallest `dataset.train_limit` that gives every class a training image and, without a fixed
    evaluation set, a validation image too (the stratified split takes round(limit x val_fraction))."""
    if shared_eval or not val_fraction:
        return classes
    limit = classes
    while round(limit * val_fraction) < classes or limit - round(limit * val_fraction) < classes:
        limit += 1
    return limit


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


@dataclass(frozen=True)
class Rows:
    """Which rows of the source's train and test splits a config uses."""

    train: np.ndarray
    eval: np.ndarray  # from the training images `train` leaves: a fixed evaluation set
    test: np.ndarray


# The evaluation and test rows are drawn with seeds of their own, never `dataset.subset_seed`: a designed study
# draws another training subset for every run (its replicate), and all of them are scored on the same images.
EVAL_DRAW, TEST_DRAW = 1_000_003, 1_000_033


def subset_indices(y_train: np.ndarray, y_test: np.ndarray, dataset_cfg) -> Rows:
    """The rows `dataset.train_limit`/`eval_limit`/`test_limit` pick.

    The evaluation set (`eval_limit`) is drawn first from the training images, and the test subset
    from the test images, each with a fixed seed of its own; the training subset is then drawn from
    what the evaluation set leaves, with `dataset.subset_seed`. So changing the subset seed (a new
    replicate) changes only which images train, never the images every trial is scored on.
    """
    eval_limit = dataset_cfg.get("eval_limit")
    eval_idx = np.array([], int)
    pool = np.arange(len(y_train))
    if eval_limit is not None:
        if int(eval_limit) >= len(y_train):
            raise DataError(f"dataset.eval_limit={eval_limit} leaves none of the {len(y_train)} training images to "
                            "train on; lower it.")
        eval_idx = stratified_sample(y_train, int(eval_limit), np.random.default_rng(EVAL_DRAW))
        pool = np.setdiff1d(pool, eval_idx)
    train_limit = dataset_cfg.train_limit
    if train_limit is not None and int(train_limit) > len(pool):
        raise DataError(f"dataset.train_limit={train_limit}: only {len(pool)} training images are left over by "
                        f"dataset.eval_limit={eval_limit} (of {len(y_train)}); lower one of them.")
    train_idx = pool[_limit(y_train[pool], train_limit, np.random.default_rng(int(dataset_cfg.subset_seed)),
                            "dataset.train_limit")]
    test_idx = _limit(y_test, dataset_cfg.test_limit, np.random.default_rng(TEST_DRAW), "dataset.test_limit")
    return Rows(train_idx, eval_idx, test_idx)


def _limit(y: np.ndarray, limit, rng: np.random.Generator, key: str) -> np.ndarray:
    if limit is None or int(limit) >= len(y):
        return rng.permutation(len(y))
    if int(limit) < 1:
        raise DataError(f"{key}={limit} must be a positive number of images, or null for all.")
    return stratified_sample(y, int(limit), rng)

"""The `dataset` section: what each key may hold, checked once before anything is located, decoded or created.

Pure (no numpy work, no file access), so that a config is validated in milliseconds.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from cnnexp import checks
from cnnexp.data.raw import smallest_limit
from cnnexp.errors import ConfigError

NAMES = ("cifar10", "mnist", "fashion_mnist", "folder")  # what `cnnexp.data.locate` knows how to find
SCALES = ("unit", "standardize")


def validate_dataset_config(dataset_cfg, val_fraction: float) -> None:
    """Check types and ranges of the `dataset` section; every message names the key and the value.

    Args:
        dataset_cfg: the composed `dataset` section.
        val_fraction: `train.val_fraction`, for the smallest training subset that can be split.
    """
    checks.choice(dataset_cfg.get("name"), "dataset.name", NAMES)
    if OmegaConf.is_missing(dataset_cfg, "path"):
        raise ConfigError(f"dataset.path is required for dataset={dataset_cfg.name}: give dataset.path=/path/to/the/"
                          "folder (or its .tar.gz/.zip).")
    checks.text(dataset_cfg.get("path"), "dataset.path", optional=True)
    checks.flag(dataset_cfg.get("download"), "dataset.download")
    checks.image_shape(dataset_cfg.get("input_shape"), "dataset.input_shape")
    checks.number(dataset_cfg.get("num_classes"), "dataset.num_classes", integer=True, low=2, optional=True)
    checks.choice(dataset_cfg.get("scale"), "dataset.scale", SCALES)
    checks.seed(dataset_cfg.get("subset_seed"), "dataset.subset_seed")
    checks.text(dataset_cfg.get("cache_dir"), "dataset.cache_dir")
    # Only image folders split their images themselves; 0 or 1 would leave the test or the training split empty.
    checks.number(dataset_cfg.get("test_fraction"), "dataset.test_fraction", low=0, low_open=True, high=1,
                  high_open=True, optional=True)
    checks.number(dataset_cfg.get("max_bad_fraction"), "dataset.max_bad_fraction", low=0, high=1, optional=True)
    checks.number(dataset_cfg.get("max_image_pixels"), "dataset.max_image_pixels", integer=True, low=1, optional=True)
    _validate_limits(dataset_cfg, val_fraction)


def _validate_limits(dataset_cfg, val_fraction: float) -> None:
    """Subset sizes: whole numbers, and (when the class count is known) enough for every class to train and validate."""
    for key in ("train_limit", "test_limit", "eval_limit"):
        checks.number(dataset_cfg.get(key), f"dataset.{key}", integer=True, low=1, optional=True)
    classes, limit = dataset_cfg.get("num_classes"), dataset_cfg.get("train_limit")
    if classes and limit is not None:
        smallest = smallest_limit(int(classes), val_fraction, dataset_cfg.get("eval_limit") is not None)
        if limit < smallest:
            raise ConfigError(f"dataset.train_limit={limit} can't give each of the {classes} classes a training image"
                              + ("" if dataset_cfg.get("eval_limit") is not None else
                                 f" and a validation image (train.val_fraction={val_fraction})")
                              + f": the smallest dataset.train_limit that works is {smallest}.")

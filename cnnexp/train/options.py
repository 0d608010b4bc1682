"""The `train` section: what each key may hold, checked once before anything trains, and what it resolves to.

Pure (no Keras import), so that a config is validated in milliseconds.
"""

from __future__ import annotations

from cnnexp import checks, runtime
from cnnexp.errors import ConfigError

OPTIMIZERS = {  # train.optimizer -> (Keras class, default learning rate, default momentum)
    "sgd": ("SGD", 0.01, 0.9), "adam": ("Adam", 3e-4, None), "adamw": ("AdamW", 3e-4, None),
    "rmsprop": ("RMSprop", 1e-3, 0.0), "nadam": ("Nadam", 3e-4, None), "adagrad": ("Adagrad", 0.01, None),
}
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
SCHEDULES = ("constant", "cosine", "triangular")
PIPELINES = ("tf_data", "numpy")


def weight_decay(train_cfg) -> float:
    """`train.weight_decay: null` takes the optimizer's own default: AdamW's 0.004, 0 for the others."""
    value = train_cfg.get("weight_decay")
    return (0.004 if train_cfg.optimizer == "adamw" else 0.0) if value is None else float(value)


def optimizer_settings(train_cfg) -> tuple[str, float, float | None]:
    """(Keras class, peak learning rate, momentum): `train.lr: null` takes the optimizer's own default.

    SGD's 0.01 is far too high for Adam (its loss blew up to ~1500 on CIFAR-10), so a learning
    rate is only inherited when the user set one.
    """
    name, default_lr, default_momentum = OPTIMIZERS[train_cfg.optimizer]
    lr = default_lr if train_cfg.get("lr") is None else float(train_cfg.lr)
    momentum = None if default_momentum is None else (
        default_momentum if train_cfg.get("momentum") is None else float(train_cfg.momentum))
    return name, lr, momentum


def validate_train_config(train_cfg) -> None:
    """Check types and ranges of the `train` section; every message names the key to fix."""

    def number(key, **rules):
        checks.number(train_cfg.get(key), f"train.{key}", **rules)

    checks.choice(train_cfg.get("optimizer"), "train.optimizer", OPTIMIZERS)
    number("lr", low=0, low_open=True, optional=True)
    number("momentum", low=0, high=1, high_open=True, optional=True)
    number("batch_size", integer=True, low=1)
    number("epochs", integer=True, low=1)
    number("val_fraction", low=0, high=1, high_open=True)
    checks.seed(train_cfg.get("seed"), "train.seed")
    checks.seed(train_cfg.get("data_seed"), "train.data_seed", optional=True)
    number("verbose", integer=True, low=0, high=2)
    number("weight_decay", low=0, optional=True)
    number("label_smoothing", low=0, high=1, high_open=True)
    checks.flag(train_cfg.get("nesterov"), "train.nesterov")
    if train_cfg.nesterov and train_cfg.optimizer != "sgd":
        raise ConfigError(f"train.nesterov=true needs train.optimizer=sgd (it is {train_cfg.optimizer}).")
    checks.choice(train_cfg.get("precision"), "train.precision", PRECISIONS)
    checks.choice(train_cfg.get("jit_compile"), "train.jit_compile", ("auto", True, False))
    if train_cfg.get("steps_per_execution") != "auto":
        number("steps_per_execution", integer=True, low=1)
    checks.choice(train_cfg.get("pipeline"), "train.pipeline", PIPELINES)
    if train_cfg.pipeline == "tf_data" and not runtime.tensorflow_installed():
        raise ConfigError("train.pipeline=tf_data needs TensorFlow, which is not installed here: set "
                          "train.pipeline=numpy (the JAX path, augmented per image in NumPy).")
    if train_cfg.get("images_per_epoch") is not None:
        number("images_per_epoch", integer=True, low=int(train_cfg.batch_size))
        if train_cfg.pipeline != "tf_data":
            raise ConfigError("train.images_per_epoch needs train.pipeline=tf_data (an endless, reshuffled stream).")
    _validate_schedule(train_cfg.schedule)
    _validate_augment(train_cfg.augment)
    stopping = train_cfg.early_stopping
    if stopping.enabled:
        checks.choice(stopping.monitor, "train.early_stopping.monitor",
                      ("val_loss", "val_accuracy", "loss", "accuracy"))
        checks.number(stopping.patience, "train.early_stopping.patience", integer=True, low=0)


def _validate_schedule(schedule) -> None:
    checks.choice(schedule.get("name"), "train.schedule.name", SCHEDULES)
    checks.number(schedule.get("warmup"), "train.schedule.warmup", low=0, high=1, high_open=True)
    checks.number(schedule.get("final"), "train.schedule.final", low=0, high=1)


def _validate_augment(augment) -> None:
    checks.flag(augment.get("flip"), "train.augment.flip")
    checks.number(augment.get("translate"), "train.augment.translate", integer=True, low=0)
    checks.flag(augment.get("tta_flip"), "train.augment.tta_flip")


def validate_augment_size(augment, image_shape) -> None:
    """A shift is a crop of the image padded by reflection, which needs fewer pixels of padding than the image has."""
    side = min(int(image_shape[0]), int(image_shape[1]))
    if augment.translate >= side:
        raise ConfigError(f"train.augment.translate={augment.translate} must be < {side}, the smaller side of the "
                          f"{image_shape[0]}x{image_shape[1]} images (dataset.input_shape): reflection padding needs "
                          "fewer pixels than the image has.")


def is_constant_schedule(train_cfg) -> bool:
    """Whether epoch e of a longer run is the same network as a run of e epochs (no schedule, no stopping).

    Only then can the epochs question be read off one long learning curve; otherwise it needs cells.
    """
    return train_cfg.schedule.name == "constant" and not train_cfg.early_stopping.enabled


def resolve_precision(train_cfg) -> str:
    """`auto`: mixed bfloat16 where the hardware does bfloat16 natively, float32 elsewhere.

    Natively means a GPU (tensor cores) or a CPU with AVX512-BF16 or AMX; on a CPU with only
    AVX2/FMA, bfloat16 is emulated and slower than float32.
    """
    if train_cfg.precision != "auto":
        return str(train_cfg.precision)
    native_bf16 = runtime.has_gpu() or bool({"avx512_bf16", "amx_bf16"} & runtime.cpu_flags())
    return "mixed_bfloat16" if native_bf16 else "float32"


def steps_per_execution(train_cfg) -> int:
    """`auto`: 1 on a CPU (measured: no gain), 16 on an accelerator (fewer host round trips)."""
    value = train_cfg.steps_per_execution
    return (16 if runtime.has_gpu() else 1) if value == "auto" else int(value)

"""Train stage: compile, fit with validation, evaluate on the test split.

`score = (test_loss, test_accuracy)`, as in the notebook. The test split is only evaluated
once, at the end; sweeps optimise the validation metric.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

from cnnexp.config import ConfigError
from cnnexp.runtime import keras

OPTIMIZERS = {
    "sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
    "nadam": "Nadam", "adagrad": "Adagrad",
}


PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (often: learning rate too high)."""


@dataclass
class TrainResult:
    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    epochs_run: int
    train_seconds: float
    images_per_second: float
    params: int
    extra: dict = field(default_factory=dict)

    @property
    def score(self) -> tuple[float, float]:
        return self.test_loss, self.test_accuracy


def validate_train_config(train_cfg) -> None:
    """Check types and ranges of the `train` section; every message names the key to fix."""

    def number(key, *, integer=False, low=None, low_open=False, high=None, high_open=False):
        value = train_cfg.get(key)
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"train.{key}={value!r} must be {kind}.")
        if low is not None and (value <= low if low_open else value < low):
            raise ConfigError(f"train.{key}={value!r} must be {'>' if low_open else '>='} {low}.")
        if high is not None and (value >= high if high_open else value > high):
            raise ConfigError(f"train.{key}={value!r} must be {'<' if high_open else '<='} {high}.")

    if train_cfg.get("optimizer") not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={train_cfg.get('optimizer')!r} is unknown; use one of {', '.join(OPTIMIZERS)}."
        )
    number("lr", low=0, low_open=True)
    number("momentum", low=0, high=1, high_open=True)
    number("batch_size", integer=True, low=1)
    number("epochs", integer=True, low=1)
    number("val_fraction", low=0, low_open=True, high=1, high_open=True)
    number("seed", integer=True, low=0)
    number("verbose", integer=True, low=0, high=2)
    if train_cfg.get("precision") not in PRECISIONS:
        raise ConfigError(f"train.precision={train_cfg.get('precision')!r} must be one of {', '.join(PRECISIONS)}.")
    if train_cfg.get("jit_compile") not in ("auto", True, False):
        raise ConfigError(f"train.jit_compile={train_cfg.get('jit_compile')!r} must be auto, true or false.")
    if train_cfg.get("steps_per_execution") != "auto":
        number("steps_per_execution", integer=True, low=1)
    if train_cfg.get("pipeline") not in ("tf_data", "numpy"):
        raise ConfigError(f"train.pipeline={train_cfg.get('pipeline')!r} must be tf_data or numpy.")
    stopping = train_cfg.early_stopping
    if stopping.enabled:
        if stopping.monitor not in ("val_loss", "val_accuracy", "loss", "accuracy"):
            raise ConfigError(f"train.early_stopping.monitor={stopping.monitor!r} is not a Keras metric name.")
        if not isinstance(stopping.patience, int) or stopping.patience < 0:
            raise ConfigError(f"train.early_stopping.patience={stopping.patience!r} must be an integer >= 0.")


def resolve_precision(train_cfg) -> str:
    """`auto`: mixed bfloat16 on a GPU (tensor cores, no loss scaling), float32 on a CPU."""
    from cnnexp.runtime import has_gpu

    if train_cfg.precision != "auto":
        return str(train_cfg.precision)
    return "mixed_bfloat16" if has_gpu() else "float32"


def _steps_per_execution(train_cfg) -> int:
    """`auto`: 1 on a CPU (measured: no gain), 16 on an accelerator (fewer host round trips)."""
    from cnnexp.runtime import has_gpu

    value = train_cfg.steps_per_execution
    return (16 if has_gpu() else 1) if value == "auto" else int(value)


def epoch_timer():
    """A callback timing each epoch; throughput skips the first epoch, which includes compilation."""

    class EpochTimer(keras().callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._began = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._began)

        def images_per_second(self, n_images: int) -> float:
            steady = self.seconds[1:] or self.seconds
            return n_images / statistics.median(steady) if steady else 0.0

    return EpochTimer()


def make_dataset(x, y, batch_size: int, shuffle_seed: int | None = None):
    """A tf.data pipeline over in-memory arrays: cached, shuffled per epoch, prefetched."""
    from cnnexp.runtime import tensorflow

    tf = tensorflow()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_optimizer(train_cfg):
    k = keras()
    kwargs = {"learning_rate": float(train_cfg.lr)}
    if train_cfg.optimizer in ("sgd", "rmsprop"):
        kwargs["momentum"] = float(train_cfg.momentum)
    return getattr(k.optimizers, OPTIMIZERS[train_cfg.optimizer])(**kwargs)


# The cross-entropy of a softmax is at most about 16 per image (probabilities are clipped at
# 1e-7); a mean loss beyond this has blown up numerically even when it is still finite.
DIVERGED_LOSS = 1e4


def _nan_guard():
    """A callback that stops at the first epoch whose loss is NaN, infinite or blown up, saying why.

    Built on demand so that importing this module (to validate a config) does not import Keras.
    """

    class StopOnNonFiniteLoss(keras().callbacks.Callback):
        reason: str | None = None

        def on_epoch_end(self, epoch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if not math.isfinite(float(loss)):
                self.reason = f"loss became {float(loss)} in epoch {epoch + 1}"
            elif float(loss) > DIVERGED_LOSS:
                self.reason = f"loss diverged to {float(loss):.3g} in epoch {epoch + 1}"
            if self.reason:
                self.model.stop_training = True

    return StopOnNonFiniteLoss()


def train_model(model, data, train_cfg, callbacks=()) -> TrainResult:
    """Compile and fit `model` on `data`, then evaluate it on the test split.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; training stopped at that epoch.
    """
    k = keras()
    model.compile(
        optimizer=make_optimizer(train_cfg),
        loss="sparse_categorical_crossentropy",  # labels are class indices everywhere
        metrics=["accuracy"],
        jit_compile=train_cfg.jit_compile,
        steps_per_execution=_steps_per_execution(train_cfg),
    )
    nan_guard = _nan_guard()
    timer = epoch_timer()
    all_callbacks = [nan_guard, timer, *callbacks]
    if train_cfg.early_stopping.enabled:
        all_callbacks.append(k.callbacks.EarlyStopping(
            monitor=train_cfg.early_stopping.monitor, patience=train_cfg.early_stopping.patience,
            restore_best_weights=True,
        ))
    batch = int(train_cfg.batch_size)
    has_val = len(data.y_val) > 0
    if train_cfg.pipeline == "tf_data":
        inputs = {"x": make_dataset(data.x_train, data.y_train, batch, int(train_cfg.seed)), "shuffle": False}
        validation = make_dataset(data.x_val, data.y_val, batch) if has_val else None
    else:  # Keras' own adapter over the arrays, as the notebook did
        inputs = {"x": data.x_train, "y": data.y_train, "batch_size": batch}
        validation = (data.x_val, data.y_val) if has_val else None
    start = time.perf_counter()
    history = model.fit(
        **inputs,
        epochs=int(train_cfg.epochs),
        validation_data=validation,
        callbacks=all_callbacks,
        verbose=int(train_cfg.verbose),
    )
    seconds = time.perf_counter() - start
    if nan_guard.reason:
        raise NonFiniteLossError(
            f"Training stopped: {nan_guard.reason} (train.lr={train_cfg.lr}, "
            f"train.optimizer={train_cfg.optimizer}); try a smaller train.lr."
        )
    epochs_run = len(history.history.get("loss", []))
    test_loss, test_accuracy = model.evaluate(
        data.x_test, data.y_test, batch_size=max(int(train_cfg.batch_size), 256), verbose=0
    )
    return TrainResult(
        history={key: [float(v) for v in values] for key, values in history.history.items()},
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        epochs_run=epochs_run,
        train_seconds=seconds,
        images_per_second=timer.images_per_second(len(data.y_train)),
        params=int(model.count_params()),
    )

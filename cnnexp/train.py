"""Train stage: compile, fit with validation, evaluate on the test split.

`score = (test_loss, test_accuracy)`, as in the notebook. The test split is only evaluated
once, at the end; sweeps optimise the validation metric.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

from cnnexp.config import optimizer_settings
from cnnexp.errors import NonFiniteLossError
from cnnexp.runtime import keras


@dataclass
class TrainResult:
    """What one training produced. `history` holds every epoch, those before a resume included."""

    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    epochs_run: int
    train_seconds: float
    images_per_second: float
    params: int
    resumed_from_epoch: int = 0          # epochs restored from a checkpoint (0: trained from scratch)
    warnings: list[str] = field(default_factory=list)  # diverged or at chance: flagged, not failed

    @property
    def score(self) -> tuple[float, float]:
        return self.test_loss, self.test_accuracy


def resolve_precision(train_cfg) -> str:
    """`auto`: mixed bfloat16 where the hardware does bfloat16 natively, float32 elsewhere.

    Natively means a GPU (tensor cores) or a CPU with AVX512-BF16 or AMX; on a CPU with only
    AVX2/FMA, bfloat16 is emulated and slower than float32.
    """
    from cnnexp.runtime import cpu_flags, has_gpu

    if train_cfg.precision != "auto":
        return str(train_cfg.precision)
    native_bf16 = has_gpu() or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return "mixed_bfloat16" if native_bf16 else "float32"


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


def make_dataset(x, y, batch_size: int, shuffle_seed: int | None = None, repeat: bool = False):
    """A tf.data pipeline over in-memory arrays: cached, shuffled per pass, prefetched (endless with `repeat`)."""
    from cnnexp.runtime import tensorflow

    tf = tensorflow()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_optimizer(train_cfg):
    name, lr, momentum = optimizer_settings(train_cfg)
    kwargs = {"learning_rate": lr} | ({"momentum": momentum} if momentum is not None else {})
    return getattr(keras().optimizers, name)(**kwargs)


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


def at_chance(accuracy: float, n: int, num_classes: int) -> bool:
    """True when `accuracy` on `n` images is not clearly above guessing (one-sided binomial test, 1%)."""
    from scipy.stats import binomtest

    if n <= 0 or num_classes < 2 or not math.isfinite(accuracy):
        return False
    return binomtest(round(accuracy * n), n, 1 / num_classes, alternative="greater").pvalue > 0.01


def checkpoint(folder, history_file: str = "history.json"):
    """Keras' BackupAndRestore (weights, optimizer state, epoch) plus the per-epoch logs beside it.

    The logs let a resumed trial report and log the epochs it restored without training them again.
    Deleting the folder is the caller's job: a pruned or failed trial never reaches `on_train_end`.
    """
    import json
    import os

    class TrialCheckpoint(keras().callbacks.BackupAndRestore):
        def __init__(self):
            super().__init__(str(folder), delete_checkpoint=False, double_checkpoint=True)
            path = os.path.join(folder, history_file)
            self.restored: dict[str, list[float]] = {}
            if os.path.exists(path):
                with open(path) as handle:
                    self.restored = json.load(handle)
            self.logs = {k: list(v) for k, v in self.restored.items()}

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            done = int(getattr(self.model, "_initial_epoch", 0) or 0)
            # The weights say how far training got; logs past that epoch were never checkpointed.
            self.logs = {k: v[:done] for k, v in self.logs.items()}
            self.restored = {k: list(v) for k, v in self.logs.items()}

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                self.logs.setdefault(key, []).append(float(value))
            # The logs first, then the weights and epoch: a kill in between leaves logs one epoch
            # ahead of the weights, which `on_train_begin` cuts back; never weights without logs.
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{history_file}.tmp")
            with open(tmp, "w") as handle:
                json.dump(self.logs, handle)
            os.replace(tmp, os.path.join(folder, history_file))
            super().on_epoch_end(epoch, logs)

        @property
        def resumed_from(self) -> int:
            return len(next(iter(self.restored.values()), []))

    return TrialCheckpoint()


def train_model(model, data, train_cfg, callbacks=(), checkpoint_dir=None) -> TrainResult:
    """Compile and fit `model` on `data`, then evaluate it on the test split.

    Args:
        checkpoint_dir: save weights, optimizer state and epoch here at every epoch end, and resume
            from what is there (a sweep trial whose worker died).

    Raises:
        NonFiniteLossError: the loss became NaN, infinite or blew up; training stopped at that epoch.
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
    backup = checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    # The checkpoint comes before the caller's callbacks, so that whatever they log or report
    # for an epoch is already saved: a resumed trial never trains an epoch it logged.
    all_callbacks = [nan_guard, timer, *([backup] if backup else []), *callbacks]
    if train_cfg.early_stopping.enabled:
        all_callbacks.append(k.callbacks.EarlyStopping(
            monitor=train_cfg.early_stopping.monitor, patience=train_cfg.early_stopping.patience,
            restore_best_weights=True,
        ))
    batch = int(train_cfg.batch_size)
    has_val = len(data.y_val) > 0
    per_epoch = train_cfg.get("images_per_epoch")
    if per_epoch:  # an "epoch" is a chunk of the endless, reshuffled stream: fidelity in images seen
        stream = make_dataset(data.x_train, data.y_train, batch, int(train_cfg.seed), repeat=True)
        inputs = {"x": stream, "shuffle": False, "steps_per_epoch": max(1, int(per_epoch) // batch)}
        validation = make_dataset(data.x_val, data.y_val, batch) if has_val else None
    elif train_cfg.pipeline == "tf_data":
        inputs = {"x": make_dataset(data.x_train, data.y_train, batch, int(train_cfg.seed)), "shuffle": False}
        validation = make_dataset(data.x_val, data.y_val, batch) if has_val else None
    else:  # Keras' own adapter over the arrays, as the notebook did
        inputs = {"x": data.x_train, "y": data.y_train, "batch_size": batch}
        validation = (data.x_val, data.y_val) if has_val else None
    if backup is not None and not model.built:
        model.build((None, *data.input_shape))
    start = time.perf_counter()
    fitted = model.fit(
        **inputs,
        epochs=int(train_cfg.epochs),
        validation_data=validation,
        callbacks=all_callbacks,
        verbose=int(train_cfg.verbose),
    )
    seconds = time.perf_counter() - start
    if nan_guard.reason:
        _, lr, _ = optimizer_settings(train_cfg)
        raise NonFiniteLossError(
            f"Training stopped: {nan_guard.reason} (train.lr={lr:g}, "
            f"train.optimizer={train_cfg.optimizer}); try a smaller train.lr."
        )
    # With a checkpoint, its logs hold every epoch, restored or trained now (a trial resumed after
    # its last epoch trains none, and `fit` returns an empty history).
    history = ({key: list(values) for key, values in backup.logs.items()} if backup else
               {key: [float(v) for v in values] for key, values in fitted.history.items()})
    resumed = backup.resumed_from if backup else 0
    test_loss, test_accuracy = model.evaluate(
        data.x_test, data.y_test, batch_size=max(int(train_cfg.batch_size), 256), verbose=0
    )
    flags = []
    losses = history.get("loss", [])
    if len(losses) > 1 and max(losses[1:]) > 10 * losses[0]:
        flags.append(f"loss exploded: {losses[0]:.3g} in epoch 1, {max(losses[1:]):.3g} later")
    if at_chance(float(test_accuracy), len(data.y_test), data.num_classes):
        flags.append(f"test accuracy {float(test_accuracy):.3f} is at chance level (1/{data.num_classes})")
    return TrainResult(
        history=history,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        epochs_run=len(history.get("loss", [])),
        train_seconds=seconds,
        images_per_second=timer.images_per_second(int(per_epoch) if per_epoch else len(data.y_train)),
        params=int(model.count_params()),
        resumed_from_epoch=resumed,
        warnings=flags,
    )

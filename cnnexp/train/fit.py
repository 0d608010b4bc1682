"""Train stage: compile, fit with validation, evaluate on the test split.

`score = (test_loss, test_accuracy)`, as in the notebook. The test split is only evaluated
once, at the end (with `train.augment.tta_flip`, as the mean of the image's and its mirror's
predictions); sweeps optimise the validation metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cnnexp import stop
from cnnexp.errors import NonFiniteLossError
from cnnexp.runtime import keras
from cnnexp.train.callbacks import at_chance, checkpoint, epoch_timer, nan_guard, stop_at_batch_end
from cnnexp.train.options import optimizer_settings, steps_per_execution
from cnnexp.train.pipeline import fit_inputs
from cnnexp.train.pipeline import steps_per_epoch as count_steps
from cnnexp.train.recipe import make_loss, make_optimizer

# Images per inference batch (validation, test): no gradients are kept, so a large batch costs little memory and
# saves the per-batch dispatch that dominates a small model's inference on a CPU.
INFERENCE_BATCH = 1000


@dataclass
class TrainResult:
    """What one training produced. `history` holds every epoch, those before a resume included."""

    history: dict[str, list[float]]      # loss, accuracy, val_loss, val_accuracy, epoch_seconds per epoch
    test_loss: float
    test_accuracy: float
    epochs_run: int
    train_seconds: float
    images_per_second: float
    train_images: int                    # images one epoch trains on
    updates: int                         # optimizer steps, over every epoch run (resumed ones included)
    resumed_from_epoch: int = 0          # epochs restored from a checkpoint (0: trained from scratch)
    warnings: list[str] = field(default_factory=list)  # diverged or at chance: flagged, not failed
    checkpoint_error: str | None = None  # why checkpoints stopped (the trial went on without resume)
    correct: dict[int, np.ndarray] = field(default_factory=dict)  # epoch -> which validation images it got right


def _compile(model, train_cfg, total_steps: int) -> None:
    model.compile(optimizer=make_optimizer(train_cfg, total_steps), loss=make_loss(train_cfg), metrics=["accuracy"],
                  jit_compile=train_cfg.jit_compile, steps_per_execution=steps_per_execution(train_cfg))


def epoch_images(data, train_cfg) -> int:
    """Images one epoch trains on: the training split, or `train.images_per_epoch` of an endless stream."""
    per_epoch = train_cfg.get("images_per_epoch")
    return int(per_epoch) if per_epoch else len(data.y_train)


def compile_model(model, data, train_cfg) -> None:
    """Compile for this training (the schedule spans its steps) and build the optimizer's variables now, so that
    their starting values can be kept and a re-used model put back to them (`cnnexp.train.compiled`)."""
    _compile(model, train_cfg, count_steps(epoch_images(data, train_cfg), train_cfg) * int(train_cfg.epochs))
    model.optimizer.build(model.trainable_variables)


def _callbacks(train_cfg, extra, checkpoint_dir):
    """Ours first: the timer (it adds `epoch_seconds` to the logs), the NaN guard, the checkpoint; then the caller's.

    The checkpoint comes before the caller's callbacks, so that whatever they log or report for an
    epoch is already saved: a resumed trial never trains an epoch it logged.
    """
    guard, timer = nan_guard(), epoch_timer()
    backup = checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    listed = [timer, guard, *([backup] if backup else []), *extra]
    if train_cfg.early_stopping.enabled:
        listed.append(keras().callbacks.EarlyStopping(
            monitor=train_cfg.early_stopping.monitor, patience=train_cfg.early_stopping.patience,
            restore_best_weights=True))
    return listed, guard, timer, backup


def evaluate(model, x, y, train_cfg) -> tuple[float, float]:
    """(loss, accuracy) of `model` on (x, y); with `train.augment.tta_flip`, of the mean of x's and its mirror's
    predictions."""
    batch = max(int(train_cfg.batch_size), INFERENCE_BATCH)
    if not train_cfg.augment.tta_flip:
        loss, accuracy = model.evaluate(x, y, batch_size=batch, verbose=0)
        return float(loss), float(accuracy)
    loss, correct = scored(model, x, y, batch, tta_flip=True)
    return loss, float(correct.mean())


def scored(model, x, y, batch: int, tta_flip: bool = False) -> tuple[float, np.ndarray]:
    """(mean cross-entropy, which images are right) of one prediction pass (and its mirror's, with `tta_flip`)."""
    probs = model.predict(x, batch_size=batch, verbose=0)
    if tta_flip:
        probs = (probs + model.predict(x[:, :, ::-1], batch_size=batch, verbose=0)) / 2
    picked = np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-7, 1.0)
    return float(-np.log(picked).mean()), probs.argmax(axis=1) == y


def correctness_at(epochs: set[int], x, y, batch: int):
    """A callback keeping which validation images the model gets right after each epoch in `epochs` (from 1)."""

    class Correctness(keras().callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.correct: dict[int, np.ndarray] = {}

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 in epochs:
                self.correct[epoch + 1] = scored(self.model, x, y, batch)[1]

    return Correctness()


def _flags(history: dict, test_accuracy: float, data) -> list[str]:
    """Why a finished run is suspect (kept, and reported as a failed outcome): a loss that exploded, chance level."""
    flags = []
    losses = history.get("loss", [])
    if len(losses) > 1 and max(losses[1:]) > 10 * losses[0]:
        flags.append(f"loss exploded: {losses[0]:.3g} in epoch 1, {max(losses[1:]):.3g} later")
    if at_chance(test_accuracy, len(data.y_test), data.num_classes):
        flags.append(f"test accuracy {test_accuracy:.3f} is at chance level (1/{data.num_classes})")
    return flags


def train_model(model, data, train_cfg, callbacks=(), checkpoint_dir=None, curve: bool = True,
                keep_correct: set[int] = frozenset(), compiled: bool = False) -> TrainResult:
    """Compile and fit `model` on `data`, then evaluate it on the test split.

    Args:
        checkpoint_dir: save weights, optimizer state and epoch here at every epoch end, and resume
            from what is there (a sweep trial whose worker died).
        curve: validate after every epoch (a learning curve, pruning, early stopping); False validates
            once, after the last epoch, where nothing reads a curve (a fifth of an epoch saved per epoch).
        keep_correct: epochs after which to keep which validation images are right (the last epoch's
            are always kept when validating once at the end).
        compiled: `model` is compiled for this training already (`compile_model`; a re-used model of a cell).

    Raises:
        NonFiniteLossError: the loss became NaN, infinite or blew up; training stopped at that epoch.
    """
    inputs, validation, images = fit_inputs(data, train_cfg)
    per_epoch_steps = count_steps(images, train_cfg)
    if not compiled:
        compile_model(model, data, train_cfg)
    listed, guard, timer, backup = _callbacks(train_cfg, callbacks, checkpoint_dir)
    has_val = len(data.y_val) > 0
    batch = max(int(train_cfg.batch_size), INFERENCE_BATCH)
    keeper = correctness_at(set(keep_correct), data.x_val, data.y_val, batch) if keep_correct and has_val else None
    if keeper is not None:
        listed.insert(1, keeper)  # after the timer, before the checkpoint and the caller's callbacks
    if backup is not None and not model.built:
        model.build((None, *data.input_shape))
    start = time.perf_counter()
    with stop.deferred():  # a stop signal ends training at the next batch end, never inside TensorFlow's dispatch
        fitted = model.fit(**inputs, epochs=int(train_cfg.epochs), validation_data=validation if curve else None,
                           callbacks=[*listed, stop_at_batch_end()], verbose=int(train_cfg.verbose))
    seconds = time.perf_counter() - start
    if guard.reason:
        _, lr, _ = optimizer_settings(train_cfg)
        raise NonFiniteLossError(f"Training stopped: {guard.reason} (train.lr={lr:g}, "
                                 f"train.optimizer={train_cfg.optimizer}); try a smaller train.lr.")
    # With a checkpoint, its logs hold every epoch, restored or trained now (a trial resumed after
    # its last epoch trains none, and `fit` returns an empty history).
    history = ({key: list(values) for key, values in backup.logs.items()} if backup else
               {key: [float(v) for v in values] for key, values in fitted.history.items()})
    epochs_run = len(history.get("loss", []))
    correct = dict(keeper.correct) if keeper is not None else {}
    if not curve and has_val and epochs_run:  # the one validation, after the last epoch
        val_loss, correct[epochs_run] = scored(model, data.x_val, data.y_val, batch)
        history["val_loss"] = [float("nan")] * (epochs_run - 1) + [val_loss]
        history["val_accuracy"] = [float("nan")] * (epochs_run - 1) + [float(correct[epochs_run].mean())]
    test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test, train_cfg)
    return TrainResult(
        history=history, test_loss=test_loss, test_accuracy=test_accuracy, epochs_run=epochs_run,
        train_seconds=seconds, images_per_second=timer.images_per_second(images), train_images=images,
        updates=per_epoch_steps * epochs_run, resumed_from_epoch=backup.resumed_from if backup else 0,
        warnings=_flags(history, test_accuracy, data), checkpoint_error=backup.failed if backup else None,
        correct=correct,
    )

"""Callbacks every training uses: an epoch timer, a guard against a blown-up loss, and per-epoch checkpoints.

Built on demand (`keras()` is imported when a callback is made), so that importing this module to
validate a config does not import Keras.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
import warnings

from cnnexp import stop
from cnnexp.runtime import keras

# The cross-entropy of a softmax is at most about 16 per image (probabilities are clipped at
# 1e-7); a mean loss beyond this has blown up numerically even when it is still finite.
DIVERGED_LOSS = 1e4


def stop_at_batch_end():
    """A callback that ends `fit` with `stop.Interrupted` at the batch end after a stop signal (`stop.deferred`).

    Listed last: an epoch that ended is checkpointed and reported before the stop.
    """

    class StopAtBatchEnd(keras().callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stop.check()

        def on_test_batch_end(self, batch, logs=None):
            stop.check()

        def on_epoch_end(self, epoch, logs=None):
            stop.check()

    return StopAtBatchEnd()


def epoch_timer():
    """A callback timing each epoch and its validation; throughput skips the first epoch, which includes compilation."""

    class EpochTimer(keras().callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self.validation: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._began, self._validated = time.perf_counter(), 0.0

        def on_test_begin(self, logs=None):  # the validation inside `fit`
            self._test_began = time.perf_counter()

        def on_test_end(self, logs=None):
            self._validated += time.perf_counter() - self._test_began

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._began)
            self.validation.append(self._validated)
            if logs is not None:  # seen by the callbacks after this one, the checkpoint's logs and the history
                logs["epoch_seconds"] = self.seconds[-1]
                logs["val_seconds"] = self.validation[-1]

        def images_per_second(self, n_images: int) -> float:
            steady = self.seconds[1:] or self.seconds
            return n_images / statistics.median(steady) if steady else 0.0

    return EpochTimer()


def nan_guard():
    """A callback that stops at the first epoch whose loss is NaN, infinite or blown up, saying why."""

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


def _read_history(path: str) -> dict[str, list[float]]:
    """The epoch logs saved beside a checkpoint; anything that isn't {name: [numbers]} is ignored."""
    try:
        with open(path) as handle:
            logs = json.load(handle)
    except (OSError, ValueError):
        return {}
    ok = isinstance(logs, dict) and all(
        isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in logs.values())
    return {str(k): [float(x) for x in v] for k, v in logs.items()} if ok else {}


def checkpoint(folder, history_file: str = "history.json"):
    """Keras' BackupAndRestore (weights, optimizer state, epoch) plus the per-epoch logs beside it.

    The logs let a resumed trial report and log the epochs it restored without training them again.
    A checkpoint that can't be written (a full disk, a read-only folder) costs one warning: the
    trial goes on without resume, and what was half-written is removed. Deleting the folder at the
    end is the caller's job: a pruned or failed trial never reaches `on_train_end`.
    """

    class TrialCheckpoint(keras().callbacks.BackupAndRestore):
        def __init__(self):
            super().__init__(str(folder), delete_checkpoint=False, double_checkpoint=True)
            self.restored = _read_history(os.path.join(folder, history_file))
            self.logs = {k: list(v) for k, v in self.restored.items()}
            self.failed: str | None = None

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            done = int(getattr(self.model, "_initial_epoch", 0) or 0)
            # The weights say how far training got; logs past that epoch were never checkpointed.
            self.logs = {k: v[:done] for k, v in self.logs.items()}
            self.restored = {k: list(v) for k, v in self.logs.items()}

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                self.logs.setdefault(key, []).append(float(value))
            if self.failed:
                return
            try:
                # The logs first, then the weights and epoch: a kill in between leaves logs one epoch
                # ahead of the weights, which `on_train_begin` cuts back; never weights without logs.
                os.makedirs(folder, exist_ok=True)
                tmp = os.path.join(folder, f".{history_file}.tmp")
                with open(tmp, "w") as handle:
                    json.dump(self.logs, handle)
                os.replace(tmp, os.path.join(folder, history_file))
                super().on_epoch_end(epoch, logs)
            except Exception as err:  # noqa: BLE001 - h5py and the OS raise many kinds; none may stop training
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                shutil.rmtree(folder, ignore_errors=True)  # a half-written checkpoint must never be resumed
                warnings.warn(f"The checkpoint could not be written to {folder} ({self.failed}); this trial goes on "
                              "without resume (sweep.checkpoint_dir).", stacklevel=2)

        @property
        def resumed_from(self) -> int:
            return len(next(iter(self.restored.values()), []))

    return TrialCheckpoint()

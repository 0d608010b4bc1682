"""What a training recipe compiles to: the optimizer with its learning-rate schedule and weight decay, and the loss.

- `train.schedule.name`: `constant` (the default), `cosine` (linear warmup over `warmup` of the
  steps, then cosine decay to `final` x lr) or `triangular` (one-cycle: linear up from `final` x lr to
  lr at `warmup` of the steps, then linearly down to `final` x lr).
- `train.weight_decay`: decoupled from the gradient (AdamW-style; Keras applies it to every optimizer
  as `w -= lr * weight_decay * w`), never to biases or batch-norm parameters.
- `train.nesterov`: Nesterov momentum for SGD.
- `train.label_smoothing`: the target puts 1 - s on the label and s spread over all classes.

The schedule and the loss are Keras-serializable (package `cnnexp`), so a logged model loads back.
"""

from __future__ import annotations

from functools import cache

from cnnexp.runtime import keras
from cnnexp.train.options import optimizer_settings, weight_decay

NO_DECAY = ["bias", "gamma", "beta"]  # variable names weight decay never touches


@cache
def _serializable():
    """The schedule and loss classes, defined (and registered with Keras) once per process."""
    k = keras()
    ops = k.ops

    @k.saving.register_keras_serializable(package="cnnexp")
    class Triangular(k.optimizers.schedules.LearningRateSchedule):
        """One-cycle: from final*peak up to peak at `warmup` of `total` steps, then down to final*peak."""

        def __init__(self, peak: float, total: int, warmup: float = 0.2, final: float = 0.0):
            self.peak, self.total, self.warmup, self.final = float(peak), int(total), float(warmup), float(final)

        def __call__(self, step):
            t = ops.minimum(ops.cast(step, "float32") / float(max(1, self.total)), 1.0)
            up = self.final + (1.0 - self.final) * t / max(self.warmup, 1e-9)
            down = self.final + (1.0 - self.final) * (1.0 - t) / max(1.0 - self.warmup, 1e-9)
            return self.peak * ops.where(t < self.warmup, up, down)

        def get_config(self):
            return {"peak": self.peak, "total": self.total, "warmup": self.warmup, "final": self.final}

    @k.saving.register_keras_serializable(package="cnnexp")
    class SmoothedSparseCrossEntropy(k.losses.Loss):
        """Cross-entropy against class indices with label smoothing (Keras' sparse loss has none)."""

        def __init__(self, smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
            super().__init__(name=name, **kwargs)
            self.smoothing = float(smoothing)

        def call(self, y_true, y_pred):
            labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
            log_p = ops.log(ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0))
            nll = -ops.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]
            return (1.0 - self.smoothing) * nll - self.smoothing * ops.mean(log_p, axis=-1)

        def get_config(self):
            return {**super().get_config(), "smoothing": self.smoothing}

    return Triangular, SmoothedSparseCrossEntropy


def learning_rate(train_cfg, total_steps: int):
    """The peak learning rate, or a schedule over `total_steps` updates."""
    _, lr, _ = optimizer_settings(train_cfg)
    schedule = train_cfg.schedule
    if schedule.name == "constant":
        return lr
    if schedule.name == "cosine":
        warmup = int(round(float(schedule.warmup) * total_steps))
        return keras().optimizers.schedules.CosineDecay(
            initial_learning_rate=lr * float(schedule.final) if warmup else lr,
            decay_steps=max(1, total_steps - warmup),
            alpha=float(schedule.final), warmup_target=lr if warmup else None, warmup_steps=warmup)
    triangular, _ = _serializable()
    return triangular(lr, total_steps, float(schedule.warmup), float(schedule.final))


def make_optimizer(train_cfg, total_steps: int):
    """The optimizer `train` describes, stepping through `total_steps` updates."""
    name, _, momentum = optimizer_settings(train_cfg)
    kwargs = {"learning_rate": learning_rate(train_cfg, total_steps)}
    if momentum is not None:
        kwargs["momentum"] = momentum
    if train_cfg.nesterov:
        kwargs["nesterov"] = True
    decay = weight_decay(train_cfg)
    # Always explicit: AdamW would otherwise add its own default (and refuses None).
    kwargs["weight_decay"] = decay if decay or name == "AdamW" else None
    optimizer = getattr(keras().optimizers, name)(**kwargs)
    if decay:
        optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer


def make_loss(train_cfg):
    smoothing = float(train_cfg.label_smoothing)
    if not smoothing:
        return "sparse_categorical_crossentropy"  # labels are class indices everywhere
    _, smoothed = _serializable()
    return smoothed(smoothing)

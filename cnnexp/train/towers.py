"""Seeds side by side: k runs of one cell trained as one Keras model of k independent towers.

A quarter-width CNN on 2 cores leaves them idle between its small ops. k towers in one graph give
TensorFlow k independent chains of ops to run at once, for one dispatch per step instead of k.
Nothing is shared between the towers, so each one trains exactly as it would alone:

- tower i is the cell's model built under its own seed (`keras.utils.set_random_seed(seed_i)`, the
  same initial weights as a run of that seed alone: `tests/test_towers.py`);
- it is fed its own training subset (the trial's `dataset.subset_seed`) in its own order (its seed);
- the loss is the sum of the towers' losses: the gradient of tower i's weights is the gradient of
  its own loss, and the optimizer's moments and weight decay are per variable; no clipping couples them.

What is logged per tower is what it trained: its seed, its subset, its own loss and accuracy per
epoch, its own validation and test scores. Its seconds are its share of the side-by-side wall (1/k).
Validation runs once, after the last epoch (a designed study reads no curve from these cells);
nothing is checkpointed: a group lost with its worker is trained again from the start.
"""

from __future__ import annotations

import time

import numpy as np

from cnnexp import stop
from cnnexp.model.build import build_model
from cnnexp.runtime import keras, tensorflow
from cnnexp.train.callbacks import epoch_timer, nan_guard, stop_at_batch_end
from cnnexp.train.fit import INFERENCE_BATCH, TrainResult, _flags
from cnnexp.train.options import steps_per_execution
from cnnexp.train.pipeline import steps_per_epoch, tf_dataset
from cnnexp.train.recipe import make_loss, make_optimizer


def tower_name(i: int) -> str:
    return f"tower{i}"


def build_towers(layers, input_shape, num_classes: int, padding: str, seeds, name: str = "towers"):
    """One model of len(seeds) towers; tower i is `build_model` under `set_random_seed(seeds[i])`."""
    k = keras()
    towers = []
    for i, seed in enumerate(seeds):
        k.utils.set_random_seed(int(seed))
        towers.append(build_model(layers, input_shape, num_classes, padding, name=tower_name(i)))
    inputs = [k.Input(shape=tuple(int(v) for v in input_shape), name=f"images{i}") for i in range(len(seeds))]
    return k.Model(inputs, [tower(x) for tower, x in zip(towers, inputs)], name=name)


def compile_towers(model, train_cfg, images: int) -> None:
    """Each tower its own loss (Keras sums them) and accuracy; the schedule spans the training's steps."""
    n = len(model.inputs)
    total = steps_per_epoch(images, train_cfg) * int(train_cfg.epochs)
    model.compile(optimizer=make_optimizer(train_cfg, total), loss=[make_loss(train_cfg) for _ in range(n)],
                  metrics=[["accuracy"] for _ in range(n)], jit_compile=train_cfg.jit_compile,
                  steps_per_execution=steps_per_execution(train_cfg))
    model.optimizer.build(model.trainable_variables)


def _stream(datas, train_cfg, seeds):
    """The towers' batches zipped: ((x_0, ..., x_k-1), (y_0, ..., y_k-1)), each from its own subset and order."""
    tf = tensorflow()
    batch = int(train_cfg.batch_size)
    parts = []
    for data, seed in zip(datas, seeds):
        # tf.data's shuffle also follows the global seed (set by `set_random_seed` in a run alone): each tower's
        # order is the order its seed gives a run of its own.
        tf.random.set_seed(int(seed))
        parts.append(tf_dataset(data.x_train, data.y_train, batch, int(seed), augment=train_cfg.augment))
    return tf.data.Dataset.zip(tuple(parts)).map(
        lambda *pairs: (tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)))


def _predict(model, xs, tta_flip: bool) -> list[np.ndarray]:
    out = model.predict(list(xs), batch_size=INFERENCE_BATCH, verbose=0)
    if tta_flip:
        mirrored = model.predict([x[:, :, ::-1] for x in xs], batch_size=INFERENCE_BATCH, verbose=0)
        out = [(a + b) / 2 for a, b in zip(out, mirrored)]
    return list(out)


def _score(probs: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    picked = np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-7, 1.0)
    return float(-np.log(picked).mean()), probs.argmax(axis=1) == y


def train_towers(model, datas, train_cfg, seeds, callbacks=()) -> list[TrainResult]:
    """Fit the towers on their own data, then score each on the evaluation and test images.

    `datas[i]` is tower i's dataset (its own training subset; every tower's evaluation and test images have
    the same count). Raises `NonFiniteLossError` when the summed loss blows up: the caller trains the
    towers one by one then, so that only the diverging seed fails.
    """
    from cnnexp.errors import NonFiniteLossError

    n, images = len(seeds), len(datas[0].y_train)
    if any(len(d.y_train) != images for d in datas):
        raise ValueError(f"towers need equal training sets, got {[len(d.y_train) for d in datas]} images")
    guard, timer = nan_guard(), epoch_timer()
    start = time.perf_counter()
    with stop.deferred():
        fitted = model.fit(_stream(datas, train_cfg, seeds), epochs=int(train_cfg.epochs), shuffle=False,
                           callbacks=[timer, guard, *callbacks, stop_at_batch_end()], verbose=int(train_cfg.verbose))
    seconds = time.perf_counter() - start
    if guard.reason:
        raise NonFiniteLossError(f"Training stopped: {guard.reason} (in one of {n} towers)")
    logs = fitted.history
    epochs_run = len(logs.get("loss", []))
    tta = bool(train_cfg.augment.tta_flip)
    has_val = len(datas[0].y_val) > 0
    val = _predict(model, [d.x_val for d in datas], False) if has_val and epochs_run else [None] * n
    test = _predict(model, [d.x_test for d in datas], tta)
    updates = steps_per_epoch(images, train_cfg) * epochs_run
    results = []
    for i, data in enumerate(datas):
        name = tower_name(i)
        history = {"loss": [float(v) for v in logs.get(f"{name}_loss", [])],
                   "accuracy": [float(v) for v in logs.get(f"{name}_accuracy", [])],
                   "epoch_seconds": [s / n for s in timer.seconds]}
        correct = {}
        if val[i] is not None:
            val_loss, correct[epochs_run] = _score(val[i], data.y_val)
            history["val_loss"] = [float("nan")] * (epochs_run - 1) + [val_loss]
            history["val_accuracy"] = [float("nan")] * (epochs_run - 1) + [float(correct[epochs_run].mean())]
        test_loss, right = _score(test[i], data.y_test)
        test_accuracy = float(right.mean())
        results.append(TrainResult(
            history=history, test_loss=test_loss, test_accuracy=test_accuracy, epochs_run=epochs_run,
            train_seconds=seconds / n, images_per_second=n * timer.images_per_second(images), train_images=images,
            updates=updates, warnings=_flags(history, test_accuracy, data), correct=correct))
    return results


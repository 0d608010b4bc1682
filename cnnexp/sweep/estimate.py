"""Before a long sweep: say what it will cost, from one timed training step of the base config."""

from __future__ import annotations

import time

from cnnexp import runtime
from cnnexp.sweep.space import Sweep, values_of


def estimate(sweep: Sweep) -> str | None:
    """On a machine without GPU, a rough duration; None on a GPU (fast enough not to ask)."""
    if runtime.has_gpu():
        return None
    from cnnexp.model.build import build_model
    from cnnexp.run import prepare
    from cnnexp.train.recipe import make_optimizer

    cfg = sweep.base
    layers, dataset = prepare(cfg, validated=True)
    keras = runtime.keras()
    model = build_model(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding)
    model.compile(optimizer=make_optimizer(cfg.train, 1000), loss="sparse_categorical_crossentropy")
    batch = int(cfg.train.batch_size)
    x, y = dataset.x_train[:batch], dataset.y_train[:batch]
    model.train_on_batch(x, y)  # compile the step first
    began = time.perf_counter()
    for _ in range(3):
        model.train_on_batch(x, y)
    per_image = (time.perf_counter() - began) / (3 * len(y))
    keras.backend.clear_session()
    epochs = max_epochs(sweep)
    n_train = int(cfg.train.get("images_per_epoch") or len(dataset.y_train))  # an epoch may be a chunk
    trials = int(sweep.settings.n_trials) + int(sweep.settings.repeats) * int(sweep.settings.repeat_top)
    minutes = n_train * epochs * trials * per_image * 1.3 / 60  # +30% for validation and evaluation
    limit = cfg.dataset.get("train_limit")
    data_note = (f"on a dataset.train_limit={limit} subset" if limit else
                 "on the whole training split (set dataset.train_limit for a quicker look)")
    return (f"No GPU found ({runtime.device_description()}): up to {trials} trials x {epochs} epochs x "
            f"{n_train} training images {data_note}, at ~{1 / per_image:.0f} images/s of the base model: "
            f"roughly {minutes:.0f} min of training (pruning and other architectures change this).")


def max_epochs(sweep: Sweep) -> int:
    dist = sweep.space.get("train.epochs")
    if dist is None:
        return int(sweep.base.train.epochs)
    values = values_of(dist)
    return int(max(values)) if values else int(dist.high)

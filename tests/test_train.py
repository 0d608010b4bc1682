"""The training recipe: per-image augmentation, schedules, label smoothing, decoupled weight decay, Nesterov, TTA."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnexp.config import compose_config
from cnnexp.runtime import keras
from cnnexp.train import pipeline, recipe
from cnnexp.train.fit import evaluate
from cnnexp.train.options import weight_decay
from tests.conftest import CIFAR_JPEG

needs_cifar = pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f"{CIFAR_JPEG} is not there")


def _batch(n: int = 64) -> np.ndarray:
    """n copies of one asymmetric image: any difference between them is the augmentation's."""
    image = np.arange(8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3) / 192
    return np.repeat(image[None], n, axis=0)


@pytest.mark.parametrize("backend", ["numpy", "tf"])
def test_augmentation_draws_per_image_not_per_batch(backend):
    x = _batch()
    augmented = (pipeline.augment_numpy(x, np.random.default_rng(0), True, 2) if backend == "numpy"
                 else np.asarray(pipeline.augment_tf(x, True, 2)))
    distinct = {a.tobytes() for a in augmented}
    assert len(distinct) > 10  # one draw per batch would give a single distinct image
    assert augmented.shape == x.shape and augmented.dtype == x.dtype
    # Flips and reflection padding only move pixels: every value comes from the original image.
    assert np.isin(np.round(augmented * 192), np.round(x[0] * 192)).all()


def test_flip_only_mirrors_about_half_and_nothing_else():
    x = _batch(400)
    out = pipeline.augment_numpy(x, np.random.default_rng(1), True, 0)
    mirrored = np.array([np.array_equal(a, x[0][:, ::-1]) for a in out])
    kept = np.array([np.array_equal(a, x[0]) for a in out])
    assert (mirrored | kept).all() and 0.4 < mirrored.mean() < 0.6


def _train(**values):
    cfg = compose_config([f"train.{k}={v}" for k, v in values.items()])
    return cfg.train


@pytest.mark.parametrize(("schedule", "expected"), [
    ({"schedule.name": "constant"}, [0.1, 0.1, 0.1, 0.1]),
    ({"schedule.name": "triangular", "schedule.warmup": 0.25, "schedule.final": 0.0}, [0.0, 0.1, 0.05, 0.0]),
    ({"schedule.name": "cosine", "schedule.warmup": 0.25, "schedule.final": 0.0}, [0.0, 0.1, 0.05, 0.0]),
])
def test_learning_rate_schedules_peak_at_lr_and_end_where_told(schedule, expected):
    train = _train(lr=0.1, **schedule)
    rate = recipe.learning_rate(train, 100)
    # steps 0 (start), 25 (end of warmup: the peak), 62.5 (half-way down), 100 (the end)
    values = [float(rate(step)) if callable(rate) else rate for step in (0, 25, 62.5, 100)]
    assert values == pytest.approx(expected, abs=0.012)


def test_label_smoothing_is_the_smoothed_cross_entropy():
    loss = recipe.make_loss(_train(label_smoothing=0.2))
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([0, 2])
    expected = np.mean([0.8 * -np.log(p[y]) + 0.2 * -np.mean(np.log(p)) for p, y in zip(probs, labels)])
    assert float(loss(labels, probs)) == pytest.approx(expected, rel=1e-5)
    assert recipe.make_loss(_train(label_smoothing=0.0)) == "sparse_categorical_crossentropy"


def test_decoupled_weight_decay_spares_biases_and_batch_norm_and_nesterov_is_on():
    optimizer = recipe.make_optimizer(_train(weight_decay=0.01, nesterov=True, lr=0.1), 10)
    assert optimizer.weight_decay == pytest.approx(0.01) and optimizer.nesterov
    k = keras()
    model = k.Sequential([k.Input((4, 4, 1)), k.layers.Conv2D(2, 3), k.layers.BatchNormalization(),
                          k.layers.Flatten(), k.layers.Dense(2)])
    optimizer.build(model.trainable_variables)
    decayed = {v.name for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    assert decayed == {"kernel"}  # the conv and dense kernels; never bias, gamma or beta
    assert weight_decay(_train(optimizer="adamw")) == 0.004 and weight_decay(_train()) == 0.0
    assert recipe.make_optimizer(_train(optimizer="adamw", weight_decay=0.0), 10).weight_decay == 0.0


def test_test_time_flip_averages_the_image_and_its_mirror():
    k = keras()
    model = k.Sequential([k.Input((4, 4, 1)), k.layers.Flatten(), k.layers.Dense(2, activation="softmax")])
    x = np.random.default_rng(0).random((6, 4, 4, 1)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 0, 1])
    train = OmegaConf.create({"batch_size": 2, "augment": {"tta_flip": True}})
    probs = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)) / 2
    loss, accuracy = evaluate(model, x, y, train)
    assert accuracy == pytest.approx((probs.argmax(1) == y).mean())
    assert loss == pytest.approx(-np.log(probs[np.arange(6), y]).mean(), rel=1e-5)


@needs_cifar
@pytest.mark.parametrize("pipeline_name", ["tf_data", "numpy"])
def test_the_fast_recipe_trains_every_option_on_small_data(tmp_path, pipeline_name):
    from cnnexp.run import run

    cfg = compose_config(["model=fast_cnn", "train=fast", "dataset.train_limit=1500", "dataset.test_limit=300",
                          "train.epochs=2", "train.batch_size=100", "train.lr=0.1", "tracking=off", "train.verbose=0",
                          f"train.pipeline={pipeline_name}", "+width=0.5"])
    result = run(cfg)
    assert result.metrics["test_accuracy"] > 0.17  # chance is 0.10: 4 binomial SDs above it on 300 images
    assert result.updates == 2 * 15  # 1,470 training images at batch 100: 15 steps an epoch
    assert len(result.history["epoch_seconds"]) == 2

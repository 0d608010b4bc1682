"""The input pipeline: in-memory arrays, shuffled per epoch, augmented per image, batched, prefetched.

Augmentation (`train.augment`) is drawn independently for every image of a batch: a horizontal
flip with probability 1/2, and a translation of up to `translate` pixels in each direction (a
random crop of the image padded by reflection). Keras' RandomCrop layer draws one location per
batch, which is why it is not used here. The same augmentation runs in tf.data (`tf_data`) and in
NumPy (`numpy`, the backend-agnostic path that JAX uses).
"""

from __future__ import annotations

import math

import numpy as np

from cnnexp.runtime import keras, tensorflow


def augments(train_cfg) -> bool:
    augment = train_cfg.augment
    return bool(augment.flip or augment.translate)


def augment_numpy(x: np.ndarray, rng: np.random.Generator, flip: bool, translate: int) -> np.ndarray:
    """Per-image flip and translation of a batch (N, H, W, C), in NumPy."""
    n, height, width, _ = x.shape
    out = x
    if flip:
        mirrored = rng.random(n) < 0.5
        out = np.where(mirrored[:, None, None, None], out[:, :, ::-1], out)
    if translate:
        padded = np.pad(out, ((0, 0), (translate, translate), (translate, translate), (0, 0)), mode="reflect")
        dy, dx = rng.integers(0, 2 * translate + 1, (2, n))
        rows = dy[:, None] + np.arange(height)[None, :]
        cols = dx[:, None] + np.arange(width)[None, :]
        out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out


def augment_tf(x, flip: bool, translate: int):
    """Per-image flip and translation of a batch (N, H, W, C), in TensorFlow (for tf.data)."""
    tf = tensorflow()
    n, height, width = tf.shape(x)[0], x.shape[1], x.shape[2]
    if flip:
        mirrored = tf.random.uniform((n, 1, 1, 1)) < 0.5
        x = tf.where(mirrored, tf.reverse(x, [2]), x)
    if translate:
        padded = tf.pad(x, [[0, 0], [translate, translate], [translate, translate], [0, 0]], mode="REFLECT")
        dy = tf.random.uniform((n,), 0, 2 * translate + 1, dtype=tf.int32)
        dx = tf.random.uniform((n,), 0, 2 * translate + 1, dtype=tf.int32)
        rows = dy[:, None] + tf.range(height)[None, :]
        cols = dx[:, None] + tf.range(width)[None, :]
        x = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    return x


def tf_dataset(x, y, batch_size: int, shuffle_seed: int | None = None, repeat: bool = False, augment=None):
    """A tf.data pipeline: cached, shuffled per pass, augmented per image, prefetched (endless with `repeat`)."""
    from cnnexp.runtime import tensorflow

    tf = tensorflow()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size)
    if augment is not None and (augment.flip or augment.translate):
        flip, translate = bool(augment.flip), int(augment.translate)
        ds = ds.map(lambda xb, yb: (augment_tf(xb, flip, translate), yb), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def numpy_batches(x, y, batch_size: int, seed: int, augment):
    """Shuffled, augmented NumPy batches for `fit` without TensorFlow (a Keras PyDataset)."""

    class Batches(keras().utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch, self.order = -1, np.arange(len(y))
            self.on_epoch_end()

        def __len__(self):
            return math.ceil(len(y) / batch_size)

        def __getitem__(self, index):
            rows = self.order[index * batch_size:(index + 1) * batch_size]
            rng = np.random.default_rng([seed, self.epoch, index])
            return augment_numpy(x[rows], rng, bool(augment.flip), int(augment.translate)), y[rows]

        def on_epoch_end(self):
            self.epoch += 1
            self.order = np.random.default_rng([seed, self.epoch]).permutation(len(y))

    return Batches()


def fit_inputs(data, train_cfg) -> tuple[dict, object, int]:
    """(the `fit` keyword arguments for the training data, the validation data, images per epoch)."""
    batch = int(train_cfg.batch_size)
    # The data order (and NumPy augmentation) follows train.data_seed when set: initialisation and order
    # can then be varied apart (benchmarks/noise_sources.py measures each one's share of the noise).
    seed = int(train_cfg.seed if train_cfg.get("data_seed") is None else train_cfg.data_seed)
    has_val = len(data.y_val) > 0
    per_epoch = train_cfg.get("images_per_epoch")
    augment = train_cfg.augment
    if per_epoch:  # an "epoch" is a chunk of the endless, reshuffled stream: fidelity in images seen
        stream = tf_dataset(data.x_train, data.y_train, batch, seed, repeat=True, augment=augment)
        inputs = {"x": stream, "shuffle": False, "steps_per_epoch": max(1, int(per_epoch) // batch)}
        validation = tf_dataset(data.x_val, data.y_val, batch) if has_val else None
        return inputs, validation, int(per_epoch)
    if train_cfg.pipeline == "tf_data":
        inputs = {"x": tf_dataset(data.x_train, data.y_train, batch, seed, augment=augment), "shuffle": False}
        validation = tf_dataset(data.x_val, data.y_val, batch) if has_val else None
    elif augments(train_cfg) or train_cfg.get("data_seed") is not None:
        # Our own batches: their order follows data_seed alone (Keras' adapter and tf.data's shuffle also
        # follow the global seed that train.seed sets, so initialisation and order could not be told apart).
        inputs = {"x": numpy_batches(data.x_train, data.y_train, batch, seed, augment)}
        validation = (data.x_val, data.y_val) if has_val else None
    else:  # Keras' own adapter over the arrays, as the notebook did
        inputs = {"x": data.x_train, "y": data.y_train, "batch_size": batch}
        validation = (data.x_val, data.y_val) if has_val else None
    return inputs, validation, len(data.y_train)


def steps_per_epoch(n_images: int, train_cfg) -> int:
    per_epoch = train_cfg.get("images_per_epoch")
    batch = int(train_cfg.batch_size)
    return max(1, int(per_epoch) // batch) if per_epoch else math.ceil(n_images / batch)

"""The Keras model of a layer list: the functional API, so that residual blocks are plain additions."""

from __future__ import annotations

from collections.abc import Sequence

from cnnexp.model.layers import LayerSpec, dense_activation, parse_layers
from cnnexp.model.shapes import validate_architecture
from cnnexp.runtime import keras


def _activation(name: str | None):
    return None if name in (None, "none") else name


def _apply(specs: Sequence[LayerSpec], x, padding: str, top: bool):
    k = keras()
    for i, spec in enumerate(specs):
        if spec.type == "conv":
            x = k.layers.Conv2D(spec.filters, spec.kernel, padding=padding, use_bias=spec.bias,
                                activation=_activation(spec.activation))(x)
        elif spec.type == "pool":
            x = (k.layers.MaxPooling2D if spec.kind == "max" else k.layers.AveragePooling2D)(spec.size)(x)
        elif spec.type == "global_pool":
            x = (k.layers.GlobalMaxPooling2D if spec.kind == "max" else k.layers.GlobalAveragePooling2D)()(x)
        elif spec.type == "batchnorm":
            x = k.layers.BatchNormalization(momentum=spec.momentum)(x)
        elif spec.type == "activation":
            x = k.layers.Activation(spec.fn)(x)
        elif spec.type == "dropout":
            x = k.layers.Dropout(spec.rate)(x)
        elif spec.type == "flatten":
            x = k.layers.Flatten()(x)
        elif spec.type == "dense":
            last = top and i == len(specs) - 1
            # The softmax stays float32 under mixed precision, for a stable loss.
            x = k.layers.Dense(spec.units, activation=_activation(dense_activation(spec, last)), use_bias=spec.bias,
                               dtype="float32" if last else None)(x)
        elif spec.type == "residual":
            inner = _apply(spec.layers, x, padding, top=False)
            if inner.shape[-1] != x.shape[-1]:
                x = k.layers.Conv2D(inner.shape[-1], 1, use_bias=False)(x)  # project the input to the new width
            x = k.layers.Add()([x, inner])
    return x


def build_model(layers, input_shape: Sequence[int], num_classes: int | None = None, padding: str = "same",
                name: str = "cnn"):
    """Build the Keras model: each layer as written, relu by default, softmax on the last dense layer.

    Args:
        layers: a layer list in either spelling, or parsed `LayerSpec`s.
        input_shape: (height, width, channels).
        num_classes: checked against the last dense layer; None skips that check.
        padding: 'same' (keeps the map size, even kernels too) or 'valid'.

    Example:
        >>> model = build_model([("c", 8, 3), ("f", None), ("d", 10)], (32, 32, 3), 10)
    """
    specs = layers if layers and isinstance(layers[0], LayerSpec) else parse_layers(layers)
    validate_architecture(specs, input_shape, num_classes, padding)
    inputs = keras().Input(shape=tuple(int(v) for v in input_shape))
    return keras().Model(inputs, _apply(specs, inputs, padding, top=True), name=name)

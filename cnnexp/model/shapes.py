"""Shapes and cost of a layer list, known before any data is loaded or any Keras model exists.

`validate_architecture` walks the shapes through the network and rejects what Keras would fail
on, or worse, accept (a kernel that slides over zero padding only, a pool that shrinks the map
below 1x1, a dense layer fed a map, a classifier of the wrong size). `cost` counts parameters
(trainable and batch norm's moving statistics, as Keras' `count_params`) and forward FLOPs per
image: 2 per multiply-add of conv and dense layers (their bias adds included), 2 per element for
batch norm; activations and pooling are not counted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cnnexp.errors import ModelConfigError
from cnnexp.model.layers import LayerSpec


@dataclass(frozen=True)
class Cost:
    """What a network costs: parameters and FLOPs per image (one forward pass; training is about 3x)."""

    params: int
    flops: int


def _conv(spec: LayerSpec, shape: tuple, key: str, padding: str) -> tuple:
    if len(shape) != 3:
        raise ModelConfigError(f"{key}: a conv layer needs a 3-D feature map but gets {shape} (after a flatten?).")
    height, width, _ = shape
    if padding == "same" and spec.kernel > max(height, width):
        # Keras accepts it, then trains mostly on zero padding at a crawl (~1 image/s).
        warnings.warn(f"{key}.kernel={spec.kernel} is larger than the {height}x{width} feature map it slides over; "
                      "most of it multiplies zero padding and training is very slow. Use a smaller kernel.",
                      stacklevel=3)
    if padding == "valid":
        if spec.kernel > min(height, width):
            raise ModelConfigError(f"{key}.kernel={spec.kernel} is larger than the {height}x{width} feature map it "
                                   "slides over with model.padding=valid; use a smaller kernel (or +kernel) or "
                                   "model.padding=same.")
        height, width = height - spec.kernel + 1, width - spec.kernel + 1
    return height, width, spec.filters


def _pool(spec: LayerSpec, shape: tuple, key: str) -> tuple:
    if len(shape) != 3:
        raise ModelConfigError(f"{key}: a {spec.type} layer needs a 3-D feature map but gets {shape}.")
    height, width, channels = shape
    if spec.type == "global_pool":
        return (channels,)
    if spec.size > min(height, width):
        raise ModelConfigError(f"{key}.size={spec.size}: pooling the {height}x{width} feature map shrinks it below "
                               "1x1; remove a pool layer, use a smaller size, or use model.padding=same.")
    return height // spec.size, width // spec.size, channels


def _residual(spec: LayerSpec, shape: tuple, key: str, padding: str) -> tuple:
    if len(shape) != 3:
        raise ModelConfigError(f"{key}: a residual block needs a 3-D feature map but gets {shape}.")
    inner = _walk(spec.layers, shape, f"{key}.layers", padding)
    out = inner[-1] if inner else shape
    if len(out) != 3 or out[:2] != shape[:2]:
        raise ModelConfigError(f"{key}: a residual block must keep the {shape[0]}x{shape[1]} map size (its layers "
                               f"give {out}); move pools and flattens out of it and use model.padding=same.")
    return out  # channels may change: a 1x1 projection of the input is added then


def _walk(layers: Sequence[LayerSpec], shape: tuple, key: str, padding: str) -> list[tuple]:
    shapes = []
    for i, spec in enumerate(layers):
        where = f"{key}.{i}"
        if spec.type == "conv":
            shape = _conv(spec, shape, where, padding)
        elif spec.type in ("pool", "global_pool"):
            shape = _pool(spec, shape, where)
        elif spec.type == "flatten":
            shape = (math.prod(shape),)
        elif spec.type == "dense":
            if len(shape) != 1:
                raise ModelConfigError(f"{where}: a dense layer is fed the {len(shape) + 1}-D map {shape} (with the "
                                       "batch); add {type: flatten} or {type: global_pool} before it.")
            shape = (spec.units,)
        elif spec.type == "residual":
            shape = _residual(spec, shape, where, padding)
        shapes.append(shape)
    return shapes


def validate_architecture(layers: list[LayerSpec], input_shape: Sequence[int], num_classes: int | None,
                          padding: str = "same") -> list[tuple]:
    """Walk the shapes through the network; returns the output shape after each layer (no batch dimension)."""
    if padding not in ("same", "valid"):
        raise ModelConfigError(f"model.padding={padding!r} must be 'same' or 'valid'.")
    shapes = _walk(layers, tuple(int(v) for v in input_shape), "model.layers", padding)
    last, where = layers[-1], f"model.layers.{len(layers) - 1}"
    if last.type != "dense":
        raise ModelConfigError(f"{where}: the last layer must be dense (the softmax classifier), not {last.type}.")
    if last.activation not in (None, "softmax"):
        raise ModelConfigError(f"{where}.activation={last.activation!r}: "
                               "the last dense layer is the softmax classifier.")
    for i, spec in enumerate(layers[:-1]):
        if spec.type == "dense" and spec.activation == "softmax":
            raise ModelConfigError(f"model.layers.{i}.activation='softmax': only the last dense layer is a softmax.")
    if num_classes is not None and last.units != num_classes:
        raise ModelConfigError(f"{where}.units={last.units} but the dataset has {num_classes} classes; "
                               "the last dense layer must have one unit per class.")
    return shapes


def _count(layers: Sequence[LayerSpec], shape: tuple, padding: str) -> tuple[int, int, tuple]:
    """(parameters, FLOPs, output shape) of a layer list fed `shape`."""
    params = flops = 0
    for spec, out in zip(layers, _walk(layers, shape, "model.layers", padding)):
        if spec.type == "conv":
            macs = spec.kernel * spec.kernel * shape[-1] * spec.filters
            params += macs + (spec.filters if spec.bias else 0)
            flops += 2 * macs * out[0] * out[1]
        elif spec.type == "dense":
            params += shape[0] * spec.units + (spec.units if spec.bias else 0)
            flops += 2 * shape[0] * spec.units
        elif spec.type == "batchnorm":
            params += 4 * shape[-1]  # gamma, beta, and the moving mean and variance
            flops += 2 * math.prod(shape)
        elif spec.type == "residual":
            inner_params, inner_flops, _ = _count(spec.layers, shape, padding)
            params, flops = params + inner_params, flops + inner_flops + math.prod(out)
            if out[-1] != shape[-1]:  # the 1x1 projection of the input
                params += shape[-1] * out[-1]
                flops += 2 * shape[-1] * out[-1] * out[0] * out[1]
        shape = out
    return params, flops, shape


def cost(layers: list[LayerSpec], input_shape: Sequence[int], padding: str = "same") -> Cost:
    """Parameters and forward FLOPs per image from the layer shapes (see the module docstring)."""
    params, flops, _ = _count(layers, tuple(int(v) for v in input_shape), padding)
    return Cost(params=params, flops=flops)

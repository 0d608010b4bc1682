"""Model stage: a Keras CNN from a layer list, validated before any training time is spent.

Layer specs come in two spellings, both accepted anywhere a layer list is:
  readable YAML   {type: conv, filters: 64, kernel: 3}  {type: pool, size: 2}
                  {type: flatten}  {type: dense, units: 1024}  {type: dropout, rate: 0.5}
  notebook tuple  ('c', 64, 3)  ('m', 2)  ('f', None)  ('d', 1024)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnexp.errors import ModelConfigError

ALIASES = {"c": "conv", "m": "pool", "f": "flatten", "d": "dense", "r": "dropout"}
FIELDS = {  # layer type -> its fields, in tuple order
    "conv": ("filters", "kernel"),
    "pool": ("size",),
    "flatten": (),
    "dense": ("units",),
    "dropout": ("rate",),
}


@dataclass(frozen=True)
class LayerSpec:
    type: str
    filters: int | None = None
    kernel: int | None = None
    size: int | None = None
    units: int | None = None
    rate: float | None = None


def parse_layers(layers) -> list[LayerSpec]:
    """Normalise a layer list (dicts or notebook tuples) into `LayerSpec`s, checking fields."""
    if isinstance(layers, (DictConfig, ListConfig)):
        layers = OmegaConf.to_container(layers, resolve=True)
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not layers:
        raise ModelConfigError(f"model.layers must be a non-empty list of layers. Received: {layers!r}")
    return [_parse_layer(spec, f"model.layers.{i}") for i, spec in enumerate(layers)]


def _parse_layer(spec, key: str) -> LayerSpec:
    if isinstance(spec, Mapping):
        values = dict(spec)
        kind = values.pop("type", None)
    elif isinstance(spec, Sequence) and not isinstance(spec, str) and spec:
        kind, *rest = spec
        fields = FIELDS.get(ALIASES.get(kind, kind))
        if fields is None:
            values = {}
        else:
            rest = [v for v in rest if v is not None]  # ('f', None) has no fields
            if len(rest) > len(fields):
                raise ModelConfigError(f"{key}: {spec!r} has too many values for a {kind!r} layer.")
            values = dict(zip(fields, rest))
    else:
        raise ModelConfigError(f"{key}: a layer is a mapping or a tuple. Received: {spec!r}")
    kind = ALIASES.get(kind, kind)
    if kind not in FIELDS:
        raise ModelConfigError(
            f"{key}.type: unknown layer type {kind!r}; use one of "
            f"{', '.join(FIELDS)} (or the notebook's c, m, f, d)."
        )
    unknown = set(values) - set(FIELDS[kind])
    if unknown:
        raise ModelConfigError(f"{key}: a {kind} layer has no field(s) {sorted(unknown)}; it takes {list(FIELDS[kind])}.")
    missing = [f for f in FIELDS[kind] if values.get(f) is None]
    if missing:
        raise ModelConfigError(f"{key}: a {kind} layer needs {missing}.")
    for field, value in values.items():
        if field == "rate":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ModelConfigError(f"{key}.rate={value!r} must be a number in [0, 1).")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelConfigError(f"{key}.{field}={value!r} must be a positive integer.")
    return LayerSpec(type=kind, **values)


def apply_shortcuts(layers: list[LayerSpec], kernel=None, filters=None, width=None) -> list[LayerSpec]:
    """Apply the command-line knobs `+kernel`, `+filters` and `+width` to every conv layer.

    Args:
        layers: parsed layers.
        kernel: one kernel size for every conv layer (`+kernel=7`).
        filters: one filter count for every conv layer, or a list with one per conv layer.
        width: a multiplier on every conv layer's filters (rounded, at least 1).
    """
    convs = [i for i, spec in enumerate(layers) if spec.type == "conv"]
    if isinstance(filters, (ListConfig, list, tuple)):
        filters = list(filters)
        if len(filters) != len(convs):
            raise ModelConfigError(
                f"+filters={filters} gives {len(filters)} values for {len(convs)} conv layers; "
                "give one value for all or one per conv layer."
            )
    elif filters is not None:
        filters = [filters] * len(convs)
    for name, value in (("kernel", kernel), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ModelConfigError(f"+{name}={value!r} must be a positive number.")
    if kernel is not None and not isinstance(kernel, int):
        raise ModelConfigError(f"+kernel={kernel!r} must be a positive integer.")
    out = list(layers)
    for n, i in enumerate(convs):
        spec = out[i]
        new_filters = spec.filters if filters is None else filters[n]
        if isinstance(new_filters, bool) or not isinstance(new_filters, int) or new_filters < 1:
            raise ModelConfigError(f"+filters: {new_filters!r} must be a positive integer.")
        if width is not None:
            new_filters = max(1, round(new_filters * width))
        out[i] = LayerSpec("conv", filters=new_filters, kernel=kernel or spec.kernel)
    return out


def layers_from_config(cfg) -> list[LayerSpec]:
    """The layers an experiment config describes, with its shortcuts applied."""
    return apply_shortcuts(
        parse_layers(cfg.model.layers),
        kernel=cfg.get("kernel"), filters=cfg.get("filters"), width=cfg.get("width"),
    )


def validate_architecture(
    layers: list[LayerSpec], input_shape: Sequence[int], num_classes: int | None, padding: str = "same"
) -> list[tuple]:
    """Walk the shapes through the network and reject what Keras would fail on, or worse, accept.

    Returns:
        The output shape after each layer (without the batch dimension).
    """
    if padding not in ("same", "valid"):
        raise ModelConfigError(f"model.padding={padding!r} must be 'same' or 'valid'.")
    shape = tuple(int(v) for v in input_shape)
    shapes = []
    for i, spec in enumerate(layers):
        key = f"model.layers.{i}"
        if spec.type == "conv":
            if len(shape) != 3:
                raise ModelConfigError(f"{key}: a conv layer needs a 3-D feature map but gets {shape} (after a flatten?).")
            height, width, _ = shape
            if padding == "same" and spec.kernel > max(height, width):
                # Keras accepts it, then trains mostly on zero padding at a crawl (~1 image/s).
                warnings.warn(
                    f"{key}.kernel={spec.kernel} is larger than the {height}x{width} feature map it slides over; "
                    "most of it multiplies zero padding and training is very slow. Use a smaller kernel.",
                    stacklevel=2,
                )
            if padding == "valid":
                if spec.kernel > min(height, width):
                    raise ModelConfigError(
                        f"{key}.kernel={spec.kernel} is larger than the {height}x{width} feature map it "
                        "slides over with model.padding=valid; use a smaller kernel (or +kernel) or model.padding=same."
                    )
                height, width = height - spec.kernel + 1, width - spec.kernel + 1
            shape = (height, width, spec.filters)
        elif spec.type == "pool":
            if len(shape) != 3:
                raise ModelConfigError(f"{key}: a pool layer needs a 3-D feature map but gets {shape}.")
            height, width, channels = shape
            if spec.size > min(height, width):
                raise ModelConfigError(
                    f"{key}.size={spec.size}: pooling the {height}x{width} feature map shrinks it below 1x1; "
                    "remove a pool layer, use a smaller size, or use model.padding=same."
                )
            shape = (height // spec.size, width // spec.size, channels)
        elif spec.type == "flatten":
            shape = (_product(shape),)
        elif spec.type == "dense":
            if len(shape) != 1:
                raise ModelConfigError(
                    f"{key}: a dense layer is fed the {len(shape) + 1}-D map {shape} (with the batch); "
                    f"add {{type: flatten}} before it."
                )
            shape = (spec.units,)
        shapes.append(shape)
    last = layers[-1]
    if last.type != "dense":
        raise ModelConfigError(f"model.layers.{len(layers) - 1}: the last layer must be dense (the softmax classifier), not {last.type}.")
    if num_classes is not None and last.units != num_classes:
        raise ModelConfigError(
            f"model.layers.{len(layers) - 1}.units={last.units} but the dataset has {num_classes} classes; "
            "the last dense layer must have one unit per class."
        )
    return shapes


@dataclass(frozen=True)
class Cost:
    """What a network costs: trainable parameters and FLOPs per image (one forward pass)."""

    params: int
    flops: int


def cost(layers: list[LayerSpec], input_shape: Sequence[int], padding: str = "same") -> Cost:
    """Parameters and forward FLOPs per image from the layer shapes (a multiply-add counts as 2 FLOPs).

    Training costs about 3x the forward FLOPs (forward, and the two products of the backward pass).
    """
    shapes = validate_architecture(layers, input_shape, None, padding)
    params = flops = 0
    previous = tuple(int(v) for v in input_shape)
    for spec, shape in zip(layers, shapes):
        if spec.type == "conv":
            weights = spec.kernel * spec.kernel * previous[-1] * spec.filters
            params += weights + spec.filters
            flops += 2 * weights * shape[0] * shape[1]
        elif spec.type == "dense":
            params += previous[0] * spec.units + spec.units
            flops += 2 * previous[0] * spec.units
        previous = shape
    return Cost(params=params, flops=flops)


def layers_text(layers: list[LayerSpec]) -> str:
    """The layers in one short line, e.g. 'c64k3 c64k3 m2 c128k3 m2 c128k3 f d1024 d10'."""
    short = {"conv": lambda s: f"c{s.filters}k{s.kernel}", "pool": lambda s: f"m{s.size}",
             "flatten": lambda s: "f", "dense": lambda s: f"d{s.units}", "dropout": lambda s: f"r{s.rate}"}
    return " ".join(short[s.type](s) for s in layers)


def layers_config(layers: list[LayerSpec]) -> list[dict]:
    """The layers in the readable YAML spelling, as trained (shortcuts applied)."""
    return [{"type": s.type, **{f: getattr(s, f) for f in FIELDS[s.type]}} for s in layers]


def build_model(layers, input_shape: Sequence[int], num_classes: int | None = None, padding: str = "same", name: str = "cnn"):
    """Build the Keras model: relu everywhere, softmax on the last dense layer.

    Args:
        layers: a layer list in either spelling, or parsed `LayerSpec`s.
        input_shape: (height, width, channels).
        num_classes: checked against the last dense layer; None skips that check.
        padding: 'same' (keeps the map size, even kernels too) or 'valid'.

    Example:
        >>> model = build_model([("c", 8, 3), ("f", None), ("d", 10)], (32, 32, 3), 10)
    """
    from cnnexp.runtime import keras

    k = keras()
    specs = layers if layers and isinstance(layers[0], LayerSpec) else parse_layers(layers)
    validate_architecture(specs, input_shape, num_classes, padding)
    built = [k.Input(shape=tuple(int(v) for v in input_shape))]
    for i, spec in enumerate(specs):
        last = i == len(specs) - 1
        if spec.type == "conv":
            built.append(k.layers.Conv2D(spec.filters, spec.kernel, padding=padding, activation="relu"))
        elif spec.type == "pool":
            built.append(k.layers.MaxPooling2D(spec.size))
        elif spec.type == "flatten":
            built.append(k.layers.Flatten())
        elif spec.type == "dropout":
            built.append(k.layers.Dropout(spec.rate))
        elif spec.type == "dense":
            # The softmax stays float32 under mixed precision, for a stable loss.
            built.append(k.layers.Dense(spec.units, activation="softmax" if last else "relu",
                                        dtype="float32" if last else None))
    return k.Sequential(built, name=name)


def _product(shape: tuple) -> int:
    out = 1
    for v in shape:
        out *= v
    return out

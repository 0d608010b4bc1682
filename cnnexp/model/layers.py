"""The layer language: a CNN as a list of layers, in a readable YAML form or the notebook's short tuples.

| part | readable (YAML) | tuple |
|---|---|---|
| convolution | `{type: conv, filters: 64, kernel: 3, activation: relu, bias: true}` | `(c, 64, 3)` |
| max / average pooling | `{type: pool, size: 2, kind: max}` | `(m, 2)` max, `(p, 2)` average |
| global pooling | `{type: global_pool, kind: max}` | `(gm)` max, `(ga)` average |
| batch normalisation | `{type: batchnorm, momentum: 0.9}` | `(b)`, `(b, 0.6)` |
| activation | `{type: activation, fn: gelu}` | `(a, gelu)` |
| dropout | `{type: dropout, rate: 0.5}` | `(r, 0.5)` |
| flatten | `{type: flatten}` | `(f, null)` |
| dense | `{type: dense, units: 1024, activation: relu, bias: true}` | `(d, 1024)` |
| residual block | `{type: residual, layers: [...]}`: input + the inner layers' output | `(res, [...])` |

The last dense layer is the softmax classifier (the only one that may say `softmax`).
Activations are `relu` (the default), `gelu` or `none`. Fields left out take their defaults; the
tuple form gives the fields in the order of the readable form, e.g. `(c, 64, 3, gelu)`,
`(c, 64, 3, none, false)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnexp import checks
from cnnexp.errors import ConfigError, ModelConfigError

ACTIVATIONS = ("relu", "gelu", "none")
ALIASES = {"c": ("conv", {}), "m": ("pool", {"kind": "max"}), "p": ("pool", {"kind": "avg"}), "f": ("flatten", {}),
           "d": ("dense", {}), "r": ("dropout", {}), "b": ("batchnorm", {}), "a": ("activation", {}),
           "gm": ("global_pool", {"kind": "max"}), "ga": ("global_pool", {"kind": "avg"}), "res": ("residual", {})}
FIELDS = {  # layer type -> {field: default (REQUIRED: must be given)}, in tuple order
    "conv": {"filters": "REQUIRED", "kernel": "REQUIRED", "activation": "relu", "bias": True},
    "pool": {"size": "REQUIRED", "kind": "max"},
    "global_pool": {"kind": "max"},
    "batchnorm": {"momentum": 0.9},  # of the moving statistics; Keras' 0.99 needs ~1,000 steps to settle
    "activation": {"fn": "REQUIRED"},
    "dropout": {"rate": "REQUIRED"},
    "flatten": {},
    "dense": {"units": "REQUIRED", "activation": None, "bias": True},  # None: relu, softmax on the last
    "residual": {"layers": "REQUIRED"},
}


@dataclass(frozen=True)
class LayerSpec:
    type: str
    filters: int | None = None
    kernel: int | None = None
    size: int | None = None
    units: int | None = None
    rate: float | None = None
    activation: str | None = None
    bias: bool | None = None
    kind: str | None = None
    fn: str | None = None
    momentum: float | None = None
    layers: tuple[LayerSpec, ...] | None = None  # a residual block's inner layers


def parse_layers(layers, key: str = "model.layers") -> list[LayerSpec]:
    """Normalise a layer list (dicts or notebook tuples) into `LayerSpec`s, checking every field."""
    if isinstance(layers, (DictConfig, ListConfig)):
        layers = OmegaConf.to_container(layers, resolve=True)
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not layers:
        raise ModelConfigError(f"{key} must be a non-empty list of layers. Received: {layers!r}")
    return [_parse_layer(spec, f"{key}.{i}") for i, spec in enumerate(layers)]


def _fields(spec, key: str) -> tuple[str, dict]:
    """(type, given fields) of a layer in either spelling."""
    if isinstance(spec, Mapping):
        values = dict(spec)
        kind = values.pop("type", None)
        kind, implied = ALIASES.get(kind, (kind, {}))
        return kind, {**implied, **values}
    if isinstance(spec, Sequence) and not isinstance(spec, str) and spec:
        letter, *rest = spec
        kind, implied = ALIASES.get(letter, (letter, {}))
        if kind not in FIELDS:
            return kind, {}
        names = [n for n in FIELDS.get(kind, {}) if n not in implied]
        rest = [v for v in rest if v is not None] if kind in ("flatten", "global_pool") else rest
        if len(rest) > len(names):
            raise ModelConfigError(f"{key}: {spec!r} has too many values for a {kind!r} layer (it takes {names}).")
        return kind, {**implied, **dict(zip(names, rest))}
    raise ModelConfigError(f"{key}: a layer is a mapping or a tuple. Received: {spec!r}")


def _parse_layer(spec, key: str) -> LayerSpec:
    kind, values = _fields(spec, key)
    if kind not in FIELDS:
        raise ModelConfigError(f"{key}.type: unknown layer type {kind!r}; use one of {', '.join(FIELDS)} "
                               f"(or the tuple letters {', '.join(ALIASES)}).")
    unknown = set(values) - set(FIELDS[kind])
    if unknown:
        raise ModelConfigError(f"{key}: a {kind} layer has no field(s) {sorted(unknown)}; "
                               f"it takes {list(FIELDS[kind])}.")
    full = {name: values.get(name, default) for name, default in FIELDS[kind].items()}
    missing = [name for name, value in full.items() if value is None and FIELDS[kind][name] is not None
               or value == "REQUIRED"]
    if missing:
        raise ModelConfigError(f"{key}: a {kind} layer needs {missing}.")
    try:
        for name, value in full.items():
            full[name] = _check_field(kind, name, value, f"{key}.{name}")
    except ConfigError as err:
        raise ModelConfigError(str(err)) from None
    return LayerSpec(type=kind, **full)


def _check_field(kind: str, name: str, value, key: str):
    if name in ("rate", "momentum"):
        return checks.number(value, key, low=0, high=1, high_open=True)
    if name == "activation":
        return None if value is None else checks.choice(value, key,
                                                        (*ACTIVATIONS, *(("softmax",) if kind == "dense" else ())))
    if name == "fn":
        return checks.choice(value, key, ACTIVATIONS[:2])
    if name == "bias":
        return checks.flag(value, key)
    if name == "kind":
        return checks.choice(value, key, ("max", "avg"))
    if name == "layers":
        return tuple(parse_layers(value, key))
    return checks.number(value, key, integer=True, low=1)  # filters, kernel, size, units


def convs(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """Every conv layer, those inside residual blocks included, in order."""
    out = []
    for spec in layers:
        if spec.type == "conv":
            out.append(spec)
        elif spec.type == "residual":
            out += convs(spec.layers)
    return out


def apply_shortcuts(layers: list[LayerSpec], kernel=None, filters=None, width=None, batchnorm=None) -> list[LayerSpec]:
    """Apply the command-line knobs `+kernel`, `+filters` and `+width` to every conv layer (in residual blocks too).

    Args:
        layers: parsed layers.
        kernel: one kernel size for every conv layer (`+kernel=7`).
        filters: one filter count for every conv layer, or a list with one per conv layer.
        width: a multiplier on every conv layer's filters (rounded, at least 1).
        batchnorm: False drops every batch normalisation layer (`+batchnorm=false`, e.g. to search BN on/off).
    """
    count = len(convs(layers))
    if isinstance(filters, (ListConfig, list, tuple)):
        filters = list(filters)
        if len(filters) != count:
            raise ModelConfigError(f"+filters={filters} gives {len(filters)} values for {count} conv layers; "
                                   "give one value for all or one per conv layer.")
    elif filters is not None:
        filters = [filters] * count
    try:
        kernel = checks.number(kernel, "+kernel", integer=True, low=1, optional=True)
        width = checks.number(width, "+width", low=0, low_open=True, optional=True)
        if batchnorm is not None:
            checks.flag(batchnorm, "+batchnorm")
        for value in filters or []:
            checks.number(value, "+filters", integer=True, low=1)
    except ConfigError as err:
        raise ModelConfigError(str(err)) from None
    queue = iter(filters or [None] * count)

    def apply(specs):
        out = []
        for spec in specs:
            if spec.type == "batchnorm" and batchnorm is False:
                continue
            if spec.type == "residual":
                spec = dataclasses.replace(spec, layers=tuple(apply(spec.layers)))
            elif spec.type == "conv":
                new = next(queue) or spec.filters
                new = max(1, round(new * width)) if width is not None else new
                spec = dataclasses.replace(spec, filters=new, kernel=kernel or spec.kernel)
            out.append(spec)
        return out

    return apply(layers)


def layers_from_config(cfg) -> list[LayerSpec]:
    """The layers an experiment config describes, with its shortcuts applied."""
    return apply_shortcuts(parse_layers(cfg.model.layers), kernel=cfg.get("kernel"), filters=cfg.get("filters"),
                           width=cfg.get("width"), batchnorm=cfg.get("batchnorm"))


def layers_text(layers: Sequence[LayerSpec]) -> str:
    """The layers in one short line, e.g. 'c64k3 c64k3 m2 c128k3 m2 c128k3 f d1024 d10'."""

    def one(s: LayerSpec) -> str:
        extras = (("" if s.activation in (None, "relu", "softmax") else f":{s.activation}")
                  + ("" if s.bias in (None, True) else "-nb"))
        return {"conv": lambda: f"c{s.filters}k{s.kernel}{extras}",
                "pool": lambda: f"{'m' if s.kind == 'max' else 'p'}{s.size}", "global_pool": lambda: f"g{s.kind}",
                "batchnorm": lambda: "b" if s.momentum == 0.9 else f"b{s.momentum}", "activation": lambda: f"a:{s.fn}",
                "dropout": lambda: f"r{s.rate}", "flatten": lambda: "f", "dense": lambda: f"d{s.units}{extras}",
                "residual": lambda: f"res[{layers_text(s.layers)}]"}[s.type]()

    return " ".join(one(s) for s in layers)


def dense_activation(spec: LayerSpec, last: bool) -> str:
    """What a dense layer computes: its activation, else relu, and softmax for the classifier."""
    return "softmax" if last else (spec.activation or "relu")


def layers_config(layers: Sequence[LayerSpec], top: bool = True) -> list[dict]:
    """The layers in the readable YAML spelling, as trained (shortcuts applied, defaults filled in)."""
    out = []
    for i, s in enumerate(layers):
        fields = {f: getattr(s, f) for f in FIELDS[s.type]}
        if s.type == "residual":
            fields["layers"] = layers_config(s.layers, top=False)
        if s.type == "dense":
            fields["activation"] = dense_activation(s, top and i == len(layers) - 1)
        out.append({"type": s.type, **fields})
    return out

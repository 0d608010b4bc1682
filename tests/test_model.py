"""The layer language: the notebook's counts, even kernels, the modern parts, costs, and every validation error."""

import numpy as np
import pytest

from cnnexp.errors import ModelConfigError
from cnnexp.model.build import build_model
from cnnexp.model.layers import apply_shortcuts, layers_config, layers_text, parse_layers
from cnnexp.model.shapes import cost, validate_architecture

NOTEBOOK = [("c", 64, 3), ("c", 64, 3), ("m", 2), ("c", 128, 3), ("m", 2), ("c", 128, 3),
            ("f", None), ("d", 1024), ("d", 10)]
# Every new part once: conv without bias and activation, batch norm, gelu, average pool, dropout, a residual
# block that widens (projection) and one that doesn't, global max pool, a dense layer without bias.
MODERN = [("c", 16, 3, "none", False), ("b",), ("a", "gelu"), ("p", 2), ("r", 0.1),
          ("res", [("c", 24, 3), ("b",)]), ("res", [("c", 24, 3, "gelu")]), ("m", 2), ("gm",), ("d", 10, None, False)]


def test_notebook_layer_config_has_the_notebooks_parameter_counts():
    model = build_model(NOTEBOOK, (32, 32, 3), 10)
    convs = [layer.count_params() for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert convs == [1792, 36928, 73856, 147584]
    assert model.layers[-1].activation.__name__ == "softmax"
    assert model.output_shape == (None, 10)
    assert cost(parse_layers(NOTEBOOK), (32, 32, 3)).params == model.count_params()


def test_readable_and_tuple_forms_are_the_same_model():
    readable = [{"type": "conv", "filters": 8, "kernel": 3}, {"type": "pool", "size": 2},
                {"type": "flatten"}, {"type": "dense", "units": 10}]
    assert parse_layers(readable) == parse_layers([("c", 8, 3), ("m", 2), ("f", None), ("d", 10)])
    modern_readable = [
        {"type": "conv", "filters": 16, "kernel": 3, "activation": "none", "bias": False}, {"type": "batchnorm"},
        {"type": "activation", "fn": "gelu"}, {"type": "pool", "size": 2, "kind": "avg"},
        {"type": "dropout", "rate": 0.1},
        {"type": "residual", "layers": [{"type": "conv", "filters": 24, "kernel": 3}, {"type": "batchnorm"}]},
        {"type": "residual", "layers": [{"type": "conv", "filters": 24, "kernel": 3, "activation": "gelu"}]},
        {"type": "pool", "size": 2}, {"type": "global_pool", "kind": "max"},
        {"type": "dense", "units": 10, "bias": False}]
    assert parse_layers(modern_readable) == parse_layers(MODERN)
    # What is logged re-parses to the same network (the last dense layer says softmax).
    assert parse_layers(layers_config(parse_layers(MODERN)))[:-1] == parse_layers(MODERN)[:-1]
    assert layers_config(parse_layers(MODERN))[-1]["activation"] == "softmax"


def test_every_modern_part_builds_with_the_shapes_and_costs_the_model_has():
    specs = parse_layers(MODERN)
    model = build_model(specs, (32, 32, 3), 10)
    shapes = validate_architecture(specs, (32, 32, 3), 10)
    assert shapes[3] == (16, 16, 16) and shapes[5] == (16, 16, 24) and shapes[8] == (24,) and shapes[-1] == (10,)
    assert cost(specs, (32, 32, 3)).params == model.count_params()
    kinds = [layer.__class__.__name__ for layer in model.layers]
    assert {"BatchNormalization", "AveragePooling2D", "GlobalMaxPooling2D", "Dropout", "Add"} <= set(kinds)
    assert kinds.count("Add") == 2 and kinds.count("Conv2D") == 4  # 3 convs and the residual's 1x1 projection
    first = model.get_layer(index=1)
    assert first.use_bias is False and first.activation.__name__ == "linear"
    assert model.layers[-1].use_bias is False
    out = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert out.shape == (2, 10) and np.allclose(np.asarray(out).sum(axis=1), 1, atol=1e-5)
    assert layers_text(specs) == ("c16k3:none-nb b a:gelu p2 r0.1 res[c24k3 b] res[c24k3:gelu] m2 gmax d10-nb")


def test_flops_count_conv_dense_and_batch_norm_by_their_shapes():
    specs = parse_layers([("c", 8, 3), ("b",), ("m", 2), ("gm",), ("d", 10)])
    # conv: 2 * 3*3*3*8 * 32*32; batch norm: 2 per element of the 32x32x8 map; dense: 2 * 8*10
    assert cost(specs, (32, 32, 3)).flops == 2 * 216 * 1024 + 2 * 8192 + 160
    assert cost(specs, (32, 32, 3)).params == (216 + 8) + 4 * 8 + (80 + 10)


@pytest.mark.parametrize("kernel", [2, 3, 4, 5, 6, 7])
def test_every_kernel_size_keeps_the_map_size_with_same_padding(kernel):
    layers = apply_shortcuts(parse_layers(NOTEBOOK), kernel=kernel)
    model = build_model(layers, (32, 32, 3), 10)
    conv_shapes = [layer.output.shape[1:3] for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [tuple(s) for s in conv_shapes] == [(32, 32), (32, 32), (16, 16), (8, 8)]
    assert all(layer.kernel_size == (kernel, kernel) for layer in model.layers if hasattr(layer, "kernel_size"))


def test_filters_and_width_shortcuts_reach_convs_inside_residual_blocks():
    layers = parse_layers(NOTEBOOK)
    assert [s.filters for s in apply_shortcuts(layers, filters=16) if s.type == "conv"] == [16] * 4
    assert [s.filters for s in apply_shortcuts(layers, filters=[8, 8, 16, 16]) if s.type == "conv"] == [8, 8, 16, 16]
    assert [s.filters for s in apply_shortcuts(layers, width=0.5) if s.type == "conv"] == [32, 32, 64, 64]
    with pytest.raises(ModelConfigError, match=r"\+filters=\[8, 8\] gives 2 values for 4 conv layers"):
        apply_shortcuts(layers, filters=[8, 8])
    modern = apply_shortcuts(parse_layers(MODERN), width=2, kernel=5)
    assert modern[5].layers[0].filters == 48 and modern[5].layers[0].kernel == 5 and modern[0].bias is False


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 0, True, "wide"])
def test_a_width_that_is_not_a_positive_finite_number_is_one_clear_error(value):
    with pytest.raises(ModelConfigError, match=r"\+width="):
        apply_shortcuts(parse_layers(NOTEBOOK), width=value)


@pytest.mark.parametrize(
    ("layers", "shape", "padding", "message"),
    [
        ([("x", 3), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.type: unknown layer type 'x'"),
        ([("c", 0, 3), ("f", None), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.filters=0 must be >= 1"),
        ([("c", 8, -1), ("f", None), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.kernel=-1 must be >= 1"),
        ([("c", 8, 3), ("f", None), ("d", 0)], (32, 32, 3), "same", r"model.layers.2.units=0 must be >= 1"),
        ([("c", 8, 3), ("m", 2), ("c", 8, 9), ("f", None), ("d", 10)], (16, 16, 3), "valid",
         r"model.layers.2.kernel=9 is larger than the 7x7 feature map"),
        ([("c", 8, 3), ("m", 4), ("m", 4), ("m", 4), ("f", None), ("d", 10)], (32, 32, 3), "same",
         r"model.layers.3.size=4: pooling the 2x2 feature map shrinks it below 1x1"),
        ([("c", 8, 3), ("f", None), ("d", 7)], (32, 32, 3), "same",
         r"model.layers.2.units=7 but the dataset has 10 classes"),
        ([("c", 8, 3), ("d", 10)], (32, 32, 3), "same", r"model.layers.1: a dense layer is fed the 4-D map .* flatten"),
        ([("c", 8, 3, "swish"), ("gm",), ("d", 10)], (32, 32, 3), "same",
         r"model.layers.0.activation='swish' must be one of relu, gelu, none"),
        ([("a", "none"), ("gm",), ("d", 10)], (32, 32, 3), "same",
         r"model.layers.0.fn='none' must be one of relu, gelu"),
        ([("c", 8, 3, "relu", "yes"), ("gm",), ("d", 10)], (32, 32, 3), "same",
         r"model.layers.0.bias='yes' must be true"),
        ([("r", 1.5), ("gm",), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.rate=1.5 must be < 1"),
        ([("gm",), ("gm",), ("d", 10)], (32, 32, 3), "same", r"model.layers.1: a global_pool layer needs a 3-D"),
        ([("res", [("m", 2)]), ("gm",), ("d", 10)], (32, 32, 3), "same",
         r"model.layers.0: a residual block must keep the 32x32 map size"),
        ([("res", [("c", 8, 0)]), ("gm",), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.layers.0.kernel=0"),
        ([("res", []), ("gm",), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.layers must be a non-empty list"),
        ([("gm",), ("d", 10, "relu")], (32, 32, 3), "same", r"the last dense layer is the softmax classifier"),
        ([("gm",), ("d", 8, "softmax"), ("d", 10)], (32, 32, 3), "same", r"only the last dense layer is a softmax"),
        ([("gm",), ("b",)], (32, 32, 3), "same", r"the last layer must be dense"),
    ],
)
def test_invalid_architectures_name_the_key_and_value(layers, shape, padding, message):
    with pytest.raises(ModelConfigError, match=message):
        validate_architecture(parse_layers(layers), shape, 10, padding)


def test_valid_padding_shrinks_and_a_fitting_kernel_passes():
    shapes = validate_architecture(parse_layers([("c", 8, 5), ("f", None), ("d", 10)]), (28, 28, 1), 10, "valid")
    assert shapes[0] == (24, 24, 8)

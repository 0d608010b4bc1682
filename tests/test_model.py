"""The layer-list builder: the notebook's counts, even kernels, and every validation error."""

import pytest

from cnnexp.model import ModelConfigError, apply_shortcuts, build_model, parse_layers, validate_architecture

NOTEBOOK = [("c", 64, 3), ("c", 64, 3), ("m", 2), ("c", 128, 3), ("m", 2), ("c", 128, 3),
            ("f", None), ("d", 1024), ("d", 10)]


def test_notebook_layer_config_has_the_notebooks_parameter_counts():
    model = build_model(NOTEBOOK, (32, 32, 3), 10)
    convs = [layer.count_params() for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert convs == [1792, 36928, 73856, 147584]
    assert model.layers[-1].activation.__name__ == "softmax"
    assert model.output_shape == (None, 10)


def test_readable_and_tuple_forms_are_the_same_model():
    readable = [{"type": "conv", "filters": 8, "kernel": 3}, {"type": "pool", "size": 2},
                {"type": "flatten"}, {"type": "dense", "units": 10}]
    assert parse_layers(readable) == parse_layers([("c", 8, 3), ("m", 2), ("f", None), ("d", 10)])


@pytest.mark.parametrize("kernel", [2, 3, 4, 5, 6, 7])
def test_every_kernel_size_keeps_the_map_size_with_same_padding(kernel):
    layers = apply_shortcuts(parse_layers(NOTEBOOK), kernel=kernel)
    model = build_model(layers, (32, 32, 3), 10)
    conv_shapes = [layer.output.shape[1:3] for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [tuple(s) for s in conv_shapes] == [(32, 32), (32, 32), (16, 16), (8, 8)]
    assert all(layer.kernel_size == (kernel, kernel) for layer in model.layers if hasattr(layer, "kernel_size"))


def test_filters_and_width_shortcuts():
    layers = parse_layers(NOTEBOOK)
    assert [s.filters for s in apply_shortcuts(layers, filters=16) if s.type == "conv"] == [16] * 4
    assert [s.filters for s in apply_shortcuts(layers, filters=[8, 8, 16, 16]) if s.type == "conv"] == [8, 8, 16, 16]
    assert [s.filters for s in apply_shortcuts(layers, width=0.5) if s.type == "conv"] == [32, 32, 64, 64]
    with pytest.raises(ModelConfigError, match=r"\+filters=\[8, 8\] gives 2 values for 4 conv layers"):
        apply_shortcuts(layers, filters=[8, 8])


@pytest.mark.parametrize(
    ("layers", "shape", "padding", "message"),
    [
        ([("x", 3), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.type: unknown layer type 'x'"),
        ([("c", 0, 3), ("f", None), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.filters=0 must be a positive"),
        ([("c", 8, -1), ("f", None), ("d", 10)], (32, 32, 3), "same", r"model.layers.0.kernel=-1 must be a positive"),
        ([("c", 8, 3), ("f", None), ("d", 0)], (32, 32, 3), "same", r"model.layers.2.units=0 must be a positive"),
        ([("c", 8, 3), ("m", 2), ("c", 8, 9), ("f", None), ("d", 10)], (16, 16, 3), "valid",
         r"model.layers.2.kernel=9 is larger than the 7x7 feature map"),
        ([("c", 8, 3), ("m", 4), ("m", 4), ("m", 4), ("f", None), ("d", 10)], (32, 32, 3), "same",
         r"model.layers.3.size=4: pooling the 2x2 feature map shrinks it below 1x1"),
        ([("c", 8, 3), ("f", None), ("d", 7)], (32, 32, 3), "same",
         r"model.layers.2.units=7 but the dataset has 10 classes"),
        ([("c", 8, 3), ("d", 10)], (32, 32, 3), "same", r"model.layers.1: a dense layer is fed the 4-D map .* add \{type: flatten\}"),
    ],
)
def test_invalid_architectures_name_the_key_and_value(layers, shape, padding, message):
    with pytest.raises(ModelConfigError, match=message):
        validate_architecture(parse_layers(layers), shape, 10, padding)


def test_valid_padding_shrinks_and_a_fitting_kernel_passes():
    shapes = validate_architecture(parse_layers([("c", 8, 5), ("f", None), ("d", 10)]), (28, 28, 1), 10, "valid")
    assert shapes[0] == (24, 24, 8)

"""Config composition: every group, the +kernel shortcut, typos and bad training values."""

import pytest

from cnnexp import CONF_DIR
from cnnexp.config import ConfigError, compose_config
from cnnexp.model.layers import layers_from_config

GROUP_OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF_DIR.iterdir()) if group.is_dir()
    for option in sorted(group.glob("*.yaml"))
]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_config_group_option_composes(group, option):
    """Selecting an option puts exactly that file's plain values into its section."""
    import yaml

    extra = ["dataset.path=/some/folder"] if (group, option) == ("dataset", "folder") else []
    cfg = compose_config([f"{group}={option}", *extra])
    written = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text())
    for key, value in written.items():
        if isinstance(value, str) and value.startswith(("${", "???")):
            continue  # interpolations and required values are resolved or set elsewhere
        assert cfg[group][key] == value, (group, option, key)


def test_optimizer_defaults_fill_the_learning_rate_unless_it_is_set():
    from cnnexp.train.options import optimizer_settings

    assert optimizer_settings(compose_config().train) == ("SGD", 0.01, 0.9)
    assert optimizer_settings(compose_config(["train.optimizer=adam"]).train) == ("Adam", 3e-4, None)
    assert optimizer_settings(compose_config(["train.optimizer=adam", "train.lr=0.002"]).train)[1] == 0.002
    assert optimizer_settings(compose_config(["train.optimizer=rmsprop"]).train) == ("RMSprop", 1e-3, 0.0)


def test_images_per_epoch_needs_the_stream_pipeline():
    assert compose_config(["train.images_per_epoch=5000"]).train.images_per_epoch == 5000
    with pytest.raises(ConfigError, match="train.images_per_epoch needs train.pipeline=tf_data"):
        compose_config(["train.images_per_epoch=5000", "train.pipeline=numpy"])
    with pytest.raises(ConfigError, match="train.images_per_epoch=10 must be >= 100"):
        compose_config(["train.images_per_epoch=10"])


def test_reproduce_command_keeps_the_last_value_of_each_key_and_absolute_paths(tmp_path, monkeypatch):
    from cnnexp.config import overrides_to_command

    monkeypatch.chdir(tmp_path)
    command = overrides_to_command(["dataset.train_limit=8000", "dataset.path=../data/x.tar.gz", "+width=0.25",
                                    "dataset.train_limit=2000"])
    assert command.count("dataset.train_limit") == 1 and "dataset.train_limit=2000" in command
    assert f"dataset.path={(tmp_path.parent / 'data' / 'x.tar.gz').resolve()}" in command


def test_default_is_the_notebook_experiment():
    cfg = compose_config()
    assert (cfg.dataset.name, cfg.model.name, cfg.train.optimizer) == ("cifar10", "seed_cnn", "sgd")
    assert (cfg.train.batch_size, cfg.train.epochs) == (100, 2)
    assert cfg.dataset.scale == "unit"  # never raw 0-255 pixels


@pytest.mark.parametrize("kernel", [2, 4, 6, 7])
def test_plus_kernel_sets_every_conv_layer(kernel):
    cfg = compose_config([f"+kernel={kernel}"])
    convs = [s for s in layers_from_config(cfg) if s.type == "conv"]
    assert len(convs) == 4 and {s.kernel for s in convs} == {kernel}


def test_per_layer_filters_and_other_overrides():
    cfg = compose_config(["model.layers.0.filters=16", "train.batch_size=256", "dataset=mnist", "model=mnist_cnn"])
    assert cfg.train.batch_size == 256 and cfg.dataset.name == "mnist"
    assert layers_from_config(cfg)[0].filters == 16


def test_a_typo_with_plus_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"Unknown config key 'kernal'. Did you mean 'kernel'\?"):
        compose_config(["+kernal=7"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'train.batchsize'. Did you mean 'train.batch_size'\?"):
        compose_config(["+train.batchsize=7"])


def test_hydra_errors_are_one_config_error_line_naming_the_fix():
    with pytest.raises(ConfigError, match="kernal"):
        compose_config(["kernal=7"])
    with pytest.raises(ConfigError, match=r"kernel is a shortcut, not a config key: write \+kernel=7"):
        compose_config(["kernel=7"])
    with pytest.raises(ConfigError, match="available options in 'dataset': cifar10, fashion_mnist, folder, mnist"):
        compose_config(["dataset=nosuch"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=0", r"train.batch_size=0 must be >= 1"),
        ("train.epochs=-1", r"train.epochs=-1 must be >= 1"),
        ("train.optimizer=sgdd", r"train.optimizer='sgdd' must be one of sgd, adam"),
        ("train.val_fraction=1.5", r"train.val_fraction=1.5 must be < 1"),
        ("train.val_fraction=-0.1", r"train.val_fraction=-0.1 must be >= 0"),
        ("train.schedule.name=linear", r"train.schedule.name='linear' must be one of constant, cosine, triangular"),
        ("train.schedule.warmup=1", r"train.schedule.warmup=1 must be < 1"),
        ("train.label_smoothing=nan", r"train.label_smoothing=nan must be a finite number"),
        ("train.weight_decay=-1", r"train.weight_decay=-1 must be >= 0"),
        ("train.nesterov=1", r"train.nesterov=1 must be true or false"),
        ("train.augment.translate=40", r"train.augment.translate=40 must be < 32, the smaller side"),
        ("train.augment.flip=maybe", r"train.augment.flip='maybe' must be true or false"),
        ("train.batch_size=abc", r"train.batch_size='abc' must be an integer"),
        ("train.lr=0", r"train.lr=0 must be > 0"),
    ],
)
def test_bad_training_values_are_rejected_with_the_key(override, message):
    # Each is one line naming the key and the value (what the CLIs print after "error: ").
    with pytest.raises(ConfigError, match=message):
        compose_config([override])

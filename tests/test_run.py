"""One experiment end to end: the real CLI, a real MLflow store, real CIFAR-10 images."""

import math

import mlflow
import pytest
from mlflow import MlflowClient

from cnnexp.config import compose_config
from cnnexp.errors import NonFiniteLossError
from cnnexp.run import run
from tests.conftest import folder_overrides, run_cli, tracking_overrides


def test_cli_trains_above_chance_and_logs_a_complete_mlflow_run(tmp_path, cifar_jpeg):
    overrides = [*folder_overrides(cifar_jpeg, train_limit=3000, test_limit=1000), "+width=0.5",
                 *tracking_overrides(tmp_path, log_model=True), "train.verbose=0"]
    proc = run_cli("cnnexp.run", *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test loss:" in proc.stdout and "test accuracy:" in proc.stdout
    printed_accuracy = float(proc.stdout.split("test accuracy:")[1].split()[0])

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    # Learned: well above the 10% that raw 0-255 pixels gave the notebook.
    assert r.data.metrics["final/test_accuracy"] == pytest.approx(printed_accuracy, abs=1e-4)
    assert r.data.metrics["final/test_accuracy"] > 0.15  # chance is 0.10: 5 binomial SDs above it on 1,000 images
    assert r.data.params["train.batch_size"] == "100" and r.data.params["dataset.name"] == "folder"
    assert r.data.params["model.layers_resolved"] == "c32k3 c32k3 m2 c64k3 m2 c64k3 f d1024 d10"
    assert {"final/test_loss", "final/train_seconds", "final/images_per_second"} <= set(r.data.metrics)
    from cnnexp.config import compose_config
    from cnnexp.model.layers import layers_from_config
    from cnnexp.model.shapes import cost

    expected = cost(layers_from_config(compose_config(["+width=0.5"])), (32, 32, 3))
    assert r.data.params["model.num_params"] == str(expected.params)
    assert r.data.params["model.flops_per_image"] == str(expected.flops)
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(r.info.run_id, name)] == [1, 2], name
    inputs = client.get_run(r.info.run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == tags_digest(r) and inputs[0].dataset.name == "folder"
    tags = r.data.tags
    assert tags["cnnexp.command"].startswith("python -m cnnexp.run dataset=folder")
    assert "+width=0.5" in tags["cnnexp.command"]
    assert tags["cnnexp.device"].startswith(("CPU", "GPU"))
    assert len(tags["cnnexp.dataset_fingerprint"]) == 16
    assert "mlflow.source.git.commit" in tags
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "model_summary.txt"} <= artifacts
    summary = client.download_artifacts(r.info.run_id, "model_summary.txt", str(tmp_path))
    assert "conv2d" in open(summary).read().lower()
    models = mlflow.search_logged_models(experiment_ids=[r.info.experiment_id], output_format="list")
    assert len(models) == 1 and models[0].source_run_id == r.info.run_id
    loaded = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    assert loaded.metadata.signature is not None


def tags_digest(run):
    return run.data.tags["cnnexp.dataset_fingerprint"]


def test_cli_reports_a_bad_architecture_in_one_line_without_training(tmp_path):
    proc = run_cli("cnnexp.run", "model.padding=valid", "+kernel=33", *tracking_overrides(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: model.layers.0.kernel=33 is larger than the 32x32 feature map" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # rejected before any run was started


def test_cli_rejects_a_typo_in_an_override(tmp_path):
    proc = run_cli("cnnexp.run", "+kernal=7", cwd=tmp_path)
    assert proc.returncode != 0 and "Did you mean 'kernel'" in proc.stderr


def test_nan_loss_fails_the_run_with_the_reason(tmp_path, cifar_jpeg):
    overrides = [*folder_overrides(cifar_jpeg, train_limit=500, test_limit=100), "+filters=4",
                 "model.layers.7.units=16", "train.lr=1e12", "train.epochs=3", "train.verbose=0",
                 *tracking_overrides(tmp_path)]
    with pytest.raises(NonFiniteLossError, match=r"loss (became nan|diverged to \S+) in epoch 1 .*train.lr=1e\+12"):
        run(compose_config(overrides), overrides=overrides)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    assert r.info.status == "FAILED" and "NonFiniteLossError" in r.data.tags["error"]
    first = client.get_metric_history(r.info.run_id, "train_loss")[0].value
    assert math.isnan(first) or first > 1e4


@pytest.mark.parametrize("options", [
    ["train.precision=mixed_float16", "train.pipeline=numpy"],
    ["train.precision=mixed_bfloat16", "train.jit_compile=false", "train.steps_per_execution=4"],
    ["train.precision=float32", "train.jit_compile=true", "train.pipeline=tf_data"],
])
def test_training_options_run_correctly_on_cpu(options, cifar_jpeg):
    overrides = [*folder_overrides(cifar_jpeg, train_limit=1000, test_limit=300), "+width=0.25",
                 "train.epochs=2", "train.verbose=0", "tracking=off", "train.optimizer=adam", *options]
    result = run(compose_config(overrides), overrides=overrides)
    history = result.history
    assert all(math.isfinite(v) for v in history["loss"]) and history["loss"][1] < history["loss"][0]
    assert result.metrics["test_accuracy"] > 0.15 and result.metrics["images_per_second"] > 0
    expected = next((o.split("=")[1] for o in options if o.startswith("train.precision")), "float32")
    assert result.model.dtype_policy.name == expected


def test_bad_training_option_names_the_key():
    from cnnexp.config import ConfigError

    with pytest.raises(ConfigError, match="train.precision='fp8' must be one of"):
        compose_config(["train.precision=fp8"])


def test_adam_alone_gets_adams_learning_rate_and_trains_well(tmp_path, cifar_jpeg):
    """`train.optimizer=adam` used to keep SGD's lr=0.01: loss 1573, 10% accuracy, FINISHED, no warning."""
    overrides = [*folder_overrides(cifar_jpeg, train_limit=3000, test_limit=1000), "+kernel=5", "+width=0.25",
                 "train.optimizer=adam", "train.epochs=3", "train.verbose=0", *tracking_overrides(tmp_path)]
    result = run(compose_config(overrides), overrides=overrides)
    assert result.metrics["test_accuracy"] > 0.25 and not result.warnings
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    assert r.data.params["train.lr"] == "0.0003" and r.data.params["train.optimizer"] == "adam"
    assert "cnnexp.flag" not in r.data.tags


def test_a_run_at_chance_is_flagged_with_a_warning_and_a_tag(tmp_path, cifar_jpeg):
    # A learning rate so small that two epochs leave the network guessing.
    overrides = [*folder_overrides(cifar_jpeg, train_limit=500, test_limit=300), "+width=0.125",
                 "train.lr=1e-7", "train.epochs=2", "train.verbose=0", *tracking_overrides(tmp_path)]
    with pytest.warns(UserWarning, match="at chance level"):
        result = run(compose_config(overrides), overrides=overrides)
    assert any("chance" in w for w in result.warnings)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    assert "chance" in r.data.tags["cnnexp.flag"] and r.info.status == "FINISHED"


def test_two_runs_starting_together_on_a_new_mlflow_store_both_log(tmp_path, cifar_jpeg):
    import subprocess
    import sys

    overrides = [*folder_overrides(cifar_jpeg, train_limit=500, test_limit=200), "+width=0.125",
                 "train.epochs=1", "train.verbose=0", *tracking_overrides(tmp_path)]
    procs = [subprocess.Popen([sys.executable, "-m", "cnnexp.run", *overrides], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def test_an_unwritable_mlflow_store_never_decides_training(tmp_path, cifar_jpeg):
    blocker = tmp_path / "store-is-a-file"
    blocker.write_text("")
    overrides = [*folder_overrides(cifar_jpeg, train_limit=500, test_limit=200), "+width=0.125",
                 "train.epochs=1", "train.verbose=0", "train.optimizer=adam",
                 f"tracking.uri=sqlite:///{blocker / 'mlflow.db'}"]
    proc = run_cli("cnnexp.run", *overrides, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy:" in proc.stdout and "MLflow run not logged" in proc.stdout
    warning_lines = [line for line in proc.stderr.splitlines() if "store-is-a-file" in line]
    assert len(warning_lines) == 1 and "can't be written" in warning_lines[0] and "Not logged" in warning_lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("train.lr=inf", "train.lr=inf must be a finite number"),
])
def test_non_finite_learning_rates_are_refused(override, message):
    from cnnexp.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose_config([override])


def test_a_kernel_larger_than_its_feature_map_warns(recwarn):
    from cnnexp.model.layers import layers_from_config
    from cnnexp.model.shapes import validate_architecture

    cfg = compose_config(["+kernel=40"])
    validate_architecture(layers_from_config(cfg), cfg.dataset.input_shape, 10, cfg.model.padding)
    messages = [str(w.message) for w in recwarn.list]
    assert any("model.layers.0.kernel=40 is larger than the 32x32 feature map" in m for m in messages)


def test_epochs_can_be_chunks_of_an_endless_stream(cifar_jpeg):
    """train.images_per_epoch: the fidelity unit of optimize.yaml (Hyperband rungs in images seen)."""
    overrides = [*folder_overrides(cifar_jpeg, train_limit=1000, test_limit=300), "+width=0.25", "tracking=off",
                 "train.optimizer=adam", "train.epochs=3", "train.images_per_epoch=400", "train.verbose=0"]
    result = run(compose_config(overrides), overrides=overrides)
    assert len(result.history["val_accuracy"]) == 3 and result.metrics["epochs_run"] == 3
    assert result.metrics["test_accuracy"] > 0.13


@pytest.mark.parametrize(("flags", "gpu", "expected", "steps"), [
    (set(), False, "float32", 1), ({"avx2", "fma"}, False, "float32", 1), ({"avx512_bf16"}, False, "mixed_bfloat16", 1),
    ({"amx_bf16"}, False, "mixed_bfloat16", 1), (set(), True, "mixed_bfloat16", 16),
])
def test_auto_speed_options_use_bfloat16_where_the_hardware_does_it_and_more_steps_per_call_on_a_gpu(
        monkeypatch, flags, gpu, expected, steps):
    """The GPU is faked here (there is none); tests/test_jax.py shows both on the JAX backend with a JAX GPU."""
    from cnnexp import runtime
    from cnnexp.train.options import resolve_precision, steps_per_execution

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(runtime, "has_gpu", lambda: gpu)
    train = compose_config().train
    assert (resolve_precision(train), steps_per_execution(train)) == (expected, steps)
    assert steps_per_execution(compose_config(["train.steps_per_execution=4"]).train) == 4  # a number is taken as is

"""The JAX path on a machine without TensorFlow or a package index (GPU machines often have JAX with CUDA only).

`make wheels` writes cnnexp and every dependency as wheels into wheels/; `make install OFFLINE=1` installs from
that folder alone. Here the folder is made for this machine (a no-op when `make test` made it), installed into a
fresh virtualenv with no index and no pip configuration, and that virtualenv, which has JAX and no TensorFlow,
runs a sweep and a run on a faked JAX GPU. Nothing here reads the repository's code: the installed wheel runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from cnnexp import PROJECT_ROOT
from tests.conftest import CIFAR_JPEG, tracking_overrides

WHEELS = PROJECT_ROOT / "wheels"
NO_MAKE = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")


def installed_env(**extra: str) -> dict:
    """The environment of a command in the offline virtualenv: its own cnnexp, never one from PYTHONPATH."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONUNBUFFERED": "1", **extra}


def make(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)


pytestmark = pytest.mark.xdist_group("jax")  # the module-scoped offline virtualenv, made once


@pytest.fixture(scope="module")
def jax_python(tmp_path_factory, cifar_jpeg):
    """A fresh virtualenv made by `make install OFFLINE=1` from wheels/ alone: pip sees no index and no config."""
    env = {k: v for k, v in os.environ.items() if k not in NO_MAKE}
    made = make("wheels", "JAX=cpu", f"WHEELS={WHEELS}", env=env)  # this machine's Python and platform
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    offline = {k: v for k, v in installed_env().items() if not k.startswith("PIP_") and k not in NO_MAKE}
    # No configuration file (this workplace's adds an index and a wheel folder); an index that can't answer.
    offline.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    venv = tmp_path_factory.mktemp("offline") / "venv"
    # --no-compile: the byte code is written at first import instead (half the install's time here).
    done = make("install", "OFFLINE=1", "JAX=cpu", f"VENV={venv}", f"WHEELS={WHEELS}", "OFFLINE_PIP_ARGS=--no-compile",
                env=offline)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    python = venv / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import importlib.util as u, cnnexp, jax; "
                            "print(cnnexp.__file__, u.find_spec('tensorflow'))"],
                           cwd=venv, env=installed_env(), capture_output=True, text=True)
    assert where.stdout.split() == [str(venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" /
                                        "site-packages" / "cnnexp" / "__init__.py"), "None"], where.stderr[-2000:]
    return python


def test_the_wheel_holds_every_package_and_config_group():
    """pyproject.toml lists cnnexp's packages and config groups by hand (conf/ and sweeps/ travel inside the wheel)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    code = {".".join(p.parent.relative_to(PROJECT_ROOT).parts) for p in (PROJECT_ROOT / "cnnexp").rglob("__init__.py")}
    groups = {f"cnnexp.conf.{p.name}" for p in (PROJECT_ROOT / "conf").iterdir() if p.is_dir()}
    assert listed == code | groups | {"cnnexp.conf", "cnnexp.sweeps"}


def test_offline_install_then_a_sweep_on_jax_imports_nothing_from_tensorflow(jax_python, tmp_path):
    env = installed_env(KERAS_BACKEND="jax")
    # The default pipeline needs TensorFlow: one line that names the key to change, before anything runs.
    refused = subprocess.run([str(jax_python), "-m", "cnnexp.run", "tracking=off"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: train.pipeline=tf_data needs TensorFlow, which is not installed here: set train.pipeline=numpy "
        "(the JAX path, augmented per image in NumPy)."], refused.stderr[-2000:]

    doc = {
        "overrides": ["dataset=folder", f"dataset.path={CIFAR_JPEG}", "dataset.train_limit=1000",
                      "dataset.test_limit=300", "+width=0.25", "train.epochs=2", "train.optimizer=adam",
                      "train.pipeline=numpy",
                      *tracking_overrides(tmp_path)],
        "sweep": {"n_trials": 2, "storage": f"sqlite:///{tmp_path / 'studies.db'}", "output_dir": str(tmp_path / "out"),
                  "estimate": False, "system_metrics": False, "sampler": {"name": "grid"}, "log_models": "best"},
        "params": {"kernel": "choice(3,5)"},
    }
    (tmp_path / "jax.yaml").write_text(yaml.safe_dump(doc))
    proc = subprocess.run([str(jax_python), "-m", "cnnexp.sweep", "--sweep", str(tmp_path / "jax.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    study = optuna.load_study(study_name="jax", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.user_attrs["test_accuracy"] > 0.15 for t in study.trials)  # learned: chance is 0.10
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["cnnexp.keras_backend"] for r in children} == {"jax"}
    # Each trial's run ends with what its process had loaded, after training, testing and logging the model;
    # the study's run after the report.
    assert [r.data.tags["cnnexp.tensorflow_loaded"] for r in runs] == ["false"] * 3
    assert (tmp_path / "out" / "jax" / "effects.csv").exists()


FAKE_GPU = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace

    from cnnexp import runtime

    jax = runtime.keras() and sys.modules["jax"]  # the backend first: Keras may ask JAX for devices itself
    real = jax.devices
    jax.devices = lambda *args, **kwargs: [SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")]
    try:  # runtime's JAX branch sees one GPU; the answer is cached for the run (the training itself runs on the CPU)
        gpu, device = runtime.has_gpu(), runtime.device_description()
    finally:
        jax.devices = real
    detected_without_tf = "tensorflow" not in sys.modules

    from cnnexp.config import compose_config
    from cnnexp.run import run

    result = run(compose_config(sys.argv[1:]))
    print(json.dumps({"gpu": gpu, "device": device, "detected_without_tf": detected_without_tf,
                      "backend": runtime.keras().backend.backend(), "policy": result.model.dtype_policy.name,
                      "steps_per_execution": result.model.steps_per_execution, "loss": result.history["loss"],
                      "tensorflow_loaded": "tensorflow" in sys.modules}))
""")


@pytest.mark.parametrize("where", ["offline", "beside TensorFlow"])
def test_on_a_jax_gpu_precision_auto_is_bfloat16_and_steps_per_execution_grows(where, request, tmp_path):
    """The JAX GPU is faked (there is none here): has_gpu() must see it without importing TensorFlow, also where
    TensorFlow is installed (the project's .venv), and the GPU's settings must train on the JAX backend."""
    if where == "offline":
        python, pipeline, env = request.getfixturevalue("jax_python"), "train.pipeline=numpy", installed_env()
    else:
        pytest.importorskip("jax")
        python, pipeline, env = sys.executable, "train.pipeline=tf_data", dict(os.environ)  # tf.data feeds JAX too
    request.getfixturevalue("cifar_jpeg")
    (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
    overrides = ["dataset=folder", f"dataset.path={CIFAR_JPEG}", "dataset.train_limit=300", "dataset.test_limit=100",
                 "+width=0.25", "train.epochs=2", "train.optimizer=adam", "train.verbose=0", "tracking=off", pipeline,
                 "train.augment.flip=true", "train.augment.translate=2"]  # numpy: our per-image PyDataset
    proc = subprocess.run([str(python), str(tmp_path / "fake_gpu.py"), *overrides], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**env, "KERAS_BACKEND": "jax"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["gpu"] and out["device"] == "GPU: NVIDIA H200 (x1)" and out["detected_without_tf"]
    assert (out["backend"], out["policy"], out["steps_per_execution"]) == ("jax", "mixed_bfloat16", 16)
    assert len(out["loss"]) == 2 and out["loss"][1] < out["loss"][0]  # 3 batches an epoch, fewer than 16: still trains
    assert out["tensorflow_loaded"] == (where != "offline")  # tf.data loads it; nothing else does

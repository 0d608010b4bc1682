"""The JAX path: a whole sweep in a virtualenv that has JAX and no TensorFlow (`make test` builds it).

GPU machines often have JAX but not TensorFlow; `KERAS_BACKEND=jax` with `train.pipeline=numpy`
must need nothing from TensorFlow, from the data to the MLflow model.
"""

import os
import subprocess

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from cnnexp import PROJECT_ROOT
from tests.conftest import CIFAR_JPEG, tracking_overrides

JAX_PYTHON = PROJECT_ROOT / ".venv-jax" / "bin" / "python"


@pytest.fixture
def jax_python(cifar_jpeg):
    if not JAX_PYTHON.exists():
        pytest.skip(f"{JAX_PYTHON} is missing: `make test` builds it (make .venv-jax/.installed-stamp)")
    return JAX_PYTHON


def test_a_sweep_runs_end_to_end_on_jax_without_tensorflow(tmp_path, jax_python):
    no_tf = subprocess.run([str(jax_python), "-c", "import tensorflow"], capture_output=True, text=True)
    assert no_tf.returncode != 0 and "No module named 'tensorflow'" in no_tf.stderr  # really without it

    doc = {
        "overrides": ["dataset=folder", f"dataset.path={CIFAR_JPEG}", "dataset.train_limit=1000",
                      "dataset.test_limit=300", "+width=0.25", "train.epochs=2", "train.optimizer=adam",
                      "train.pipeline=numpy", *tracking_overrides(tmp_path, log_model=True)],
        "sweep": {"n_trials": 2, "storage": f"sqlite:///{tmp_path / 'studies.db'}", "output_dir": str(tmp_path / "out"),
                  "estimate": False, "system_metrics": False, "sampler": {"name": "grid"}},
        "params": {"kernel": "choice(3,5)"},
    }
    (tmp_path / "jax.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(jax_python), "-m", "cnnexp.sweep", "--sweep", str(tmp_path / "jax.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    study = optuna.load_study(study_name="jax", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.user_attrs["test_accuracy"] > 0.15 for t in study.trials)  # learned: chance is 0.10
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and {r.data.tags["cnnexp.keras_backend"] for r in children} == {"jax"}
    assert (tmp_path / "out" / "jax" / "effects.csv").exists()

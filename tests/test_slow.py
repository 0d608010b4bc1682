"""The slow tier (`make test-slow`): the notebook's own experiment at a realistic size."""

import pytest
from mlflow import MlflowClient

from tests.conftest import folder_overrides, run_cli, tracking_overrides

pytestmark = pytest.mark.slow


def test_notebook_model_learns_cifar10_well_above_chance(tmp_path, cifar_jpeg):
    """The notebook's layer_config, SGD, batch 100, 2 epochs, 10,000 real images: not 10% any more."""
    overrides = [*folder_overrides(cifar_jpeg, train_limit=10000, test_limit=2000),
                 *tracking_overrides(tmp_path, log_model=True), "train.verbose=2"]
    proc = run_cli("cnnexp.run", *overrides, cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    assert r.data.params["model.layers_resolved"] == "c64k3 c64k3 m2 c128k3 m2 c128k3 f d1024 d10"
    assert r.data.metrics["test_accuracy"] > 0.35

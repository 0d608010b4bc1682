"""The Kubernetes manifests validate against the Kubernetes schemas; the Slurm scripts parse."""

import subprocess

import kubernetes_validate
import pytest
import yaml

from cnnexp import PROJECT_ROOT

K8S = sorted((PROJECT_ROOT / "sweeps" / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_strictly(path):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_job_runs_parallel_workers_on_the_shared_storage():
    docs = {d["kind"]: d for p in K8S for d in yaml.safe_load_all(p.read_text())}
    job = docs["Job"]["spec"]
    assert job["parallelism"] == job["completions"] >= 2 and job["completionMode"] == "Indexed"
    container = job["template"]["spec"]["containers"][0]
    assert "sweep.storage=$(OPTUNA_STORAGE)" in container["args"]
    assert "OPTUNA_STORAGE" in docs["Secret"]["stringData"]
    assert "MLFLOW_TRACKING_URI" in docs["ConfigMap"]["data"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["jobTemplate"]["spec"]["parallelism"] >= 2


@pytest.mark.parametrize("script", ["submit.sh", "sweep_array.sbatch"])
def test_slurm_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(PROJECT_ROOT / "sweeps" / "slurm" / script)]).returncode == 0

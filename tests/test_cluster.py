"""Scale-out: many workers on one study, PostgreSQL, an MLflow server, Slurm, faults.

Marked `cluster`. `.ci/run` starts PostgreSQL and a one-node Slurm cluster on loopback
(`.ci/services.sh`); tests whose service is absent are skipped with the reason.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from cnnexp import PROJECT_ROOT
from cnnexp.study import engine
from cnnexp.study import optuna_study as study
from cnnexp.study.space import load_sweep
from tests.helpers import finish
from tests.test_sweep import config_seeds, mlflow_runs, write_sweep

# One xdist group: these tests start several workers each, and heartbeats with a few seconds of grace; two of them
# at once on two cores would only test the scheduler.
pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("cluster")]


@pytest.fixture(autouse=True)
def _needs_cifar(cifar_jpeg):
    pass


def start_worker(path, *overrides, log: Path, worker: int = 0):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CNNEXP_WORKER": str(worker)}
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "cnnexp.sweep", "--sweep", str(path), "--no-report", *overrides],
                            stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def load(path, *overrides):
    s = load_sweep(str(path), list(overrides))
    storage = study.make_storage(str(s.settings.storage), s.settings)
    return s, optuna.load_study(study_name=s.settings.study_name, storage=storage)


def wait_for(condition, timeout=300, every=0.5, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def running_trial_of(study_path, overrides, pid):
    """A RUNNING trial of worker `pid` that already has its MLflow run."""
    try:
        _, study = load(study_path, *overrides)
    except KeyError:  # the study is not created yet
        return None
    for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("worker", "").split(":")[1:2] == [str(pid)] and t.user_attrs.get("mlflow_run_id"):
            return t
    return None


def assert_optuna_and_mlflow_agree(study, tmp_path=None, client=None, children=None):
    if children is None:
        client, _, children = mlflow_runs(tmp_path)
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    assert sorted(by_number) == sorted(t.number for t in study.trials)  # none duplicated or lost
    assert len(children) == len(study.trials)
    for t in study.trials:
        child = by_number[t.number]
        assert child.data.tags["optuna.trial_state"] == t.state.name
        if t.state.name == "COMPLETE":
            assert child.data.metrics["final/test_accuracy"] == pytest.approx(t.user_attrs["test_accuracy"])


def test_local_workers_share_one_study_exactly(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4,5)", "train.batch_size": "choice(50,100)"},
                       settings={"n_trials": 4})
    proc = subprocess.run([sys.executable, "-m", "cnnexp.sweep", "--sweep", str(path), "sweep.workers=3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _, result = load(path)
    assert [t.number for t in result.trials] == [0, 1, 2, 3]
    assert {t.state.name for t in result.trials} == {"COMPLETE"}
    assert len({t.user_attrs["worker"] for t in result.trials}) >= 2  # really shared
    # Three identically seeded samplers draw the same first configuration: it is trained with
    # three different seeds (genuine replicates), never twice with the same one.
    pairs = config_seeds(result)
    assert len(pairs) == len(set(pairs)) == 4
    assert max(sum(1 for key, _ in pairs if key == k) for k, _ in pairs) >= 2
    assert_optuna_and_mlflow_agree(result, tmp_path)
    _, parents, _ = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert (tmp_path / "out" / "tiny" / "summary.md").exists()


def test_two_workers_on_a_journal_file(tmp_path):
    """Optuna's journal file storage, for a shared file system without a database server."""
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4)"}, settings={
        "n_trials": 2, "storage": f"journal://{tmp_path / 'study.log'}"})
    proc = subprocess.run([sys.executable, "-m", "cnnexp.sweep", "--sweep", str(path), "sweep.workers=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _, result = load(path)
    assert sorted(t.number for t in result.trials) == [0, 1]
    assert {t.state.name for t in result.trials} == {"COMPLETE"}
    assert_optuna_and_mlflow_agree(result, tmp_path)


@pytest.fixture
def postgres_url():
    url = os.environ.get("CNNEXP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CNNEXP_TEST_POSTGRES_URL is not set: start PostgreSQL with `eval \"$(bash .ci/services.sh)\"`")
    return url


def test_four_workers_on_postgresql(tmp_path, postgres_url):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4,5,6)"}, settings={
        "n_trials": 5, "storage": postgres_url, "study_name": f"pg-{uuid.uuid4().hex[:8]}"})
    workers = [start_worker(path, log=tmp_path / f"w{i}.log", worker=i) for i in range(4)]
    codes = [w.wait(timeout=900) for w in workers]
    assert codes == [0, 0, 0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(4)]
    _, study = load(path)
    assert sorted(t.number for t in study.trials) == list(range(5))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2
    assert_optuna_and_mlflow_agree(study, tmp_path)
    _, parents, _ = mlflow_runs(tmp_path)
    assert len(parents) == 1


def test_sigkill_worker_trial_is_failed_as_stale_and_others_carry_on(tmp_path):
    overrides = ["sweep.heartbeat_interval=1", "sweep.grace_period=4", "train.epochs=4",
                 "dataset.train_limit=2000", "sweep.retry_failed=0"]
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4,5)"}, settings={"n_trials": 4})
    victim = start_worker(path, *overrides, log=tmp_path / "victim.log", worker=0)
    killed = wait_for(lambda: running_trial_of(path, overrides, victim.pid), what="the victim's trial")
    survivor = start_worker(path, *overrides, log=tmp_path / "survivor.log", worker=1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert survivor.wait(timeout=900) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    _, study = load(path, *overrides)
    states = {t.number: t.state.name for t in study.trials}
    assert states[killed.number] == "FAIL" and len(study.trials) == 4
    assert sorted(states.values()) == ["COMPLETE"] * 3 + ["FAIL"]
    assert study.best_trial.state.name == "COMPLETE"
    assert study.trials[killed.number].user_attrs["error"].startswith("worker lost: no heartbeat")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    lost = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert lost.info.status == "FAILED" and "worker lost" in lost.data.tags["error"]
    assert_optuna_and_mlflow_agree(study, tmp_path)


def test_a_killed_workers_trial_resumes_from_its_last_epoch_in_the_same_mlflow_run(tmp_path):
    """SIGKILL during epoch 3 of 4; the next worker trains only epochs 3-4, into the same MLflow run."""
    overrides = ["sweep.heartbeat_interval=1", "sweep.grace_period=3", "train.epochs=4",
                 "dataset.train_limit=3000", "++width=0.5", "sweep.retry_failed=1"]
    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, settings={"n_trials": 1})
    victim = start_worker(path, *overrides, log=tmp_path / "victim.log", worker=0)

    def two_epochs_reported():
        trial = running_trial_of(path, overrides, victim.pid)
        return trial if trial is not None and len(trial.intermediate_values) >= 2 else None

    lost = wait_for(two_epochs_reported, every=0.1, what="epoch 2 of the victim's trial")
    victim.send_signal(signal.SIGKILL)  # during epoch 3
    victim.wait()
    survivor = start_worker(path, *overrides, log=tmp_path / "survivor.log", worker=1)
    assert survivor.wait(timeout=900) == 0, (tmp_path / "survivor.log").read_text()[-3000:]

    _, result = load(path, *overrides)
    assert [t.state.name for t in result.trials] == ["FAIL", "COMPLETE"]
    first, retry = result.trials
    assert first.user_attrs["error"].startswith("worker lost")
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= 2 and retry.user_attrs["epochs_trained_here"] == 4 - resumed  # only what was missing
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4]
    assert retry.user_attrs["mlflow_run_id"] == lost.user_attrs["mlflow_run_id"] == first.user_attrs["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_state"] == "COMPLETE"
    for metric in ("val_accuracy", "train_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == [1, 2, 3, 4], (metric, steps)  # each epoch exactly once
    survivor_log = (tmp_path / "survivor.log").read_text()
    assert "epoch 1/4" not in survivor_log and "epoch 4/4" in survivor_log
    assert not [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]  # deleted on success
    (tmp_path / "evidence.txt").write_text(
        f"victim trained epochs 1..{len(lost.intermediate_values)}+ (killed during the next); survivor resumed from "
        f"epoch {resumed} and trained {retry.user_attrs['epochs_trained_here']}; MLflow val_accuracy steps "
        f"{sorted(m.step for m in client.get_metric_history(run.info.run_id, 'val_accuracy'))}\n")
    print((tmp_path / "evidence.txt").read_text())


def test_sigterm_marks_the_trial_kills_the_run_exits_fast_and_resumes(tmp_path):
    overrides = ["train.epochs=4", "dataset.train_limit=2000"]
    path = write_sweep(tmp_path, {"kernel": "choice(2,3)"}, settings={"n_trials": 1})
    worker = start_worker(path, *overrides, log=tmp_path / "w.log")
    trial = wait_for(lambda: running_trial_of(path, overrides, worker.pid), what="a running trial")
    time.sleep(2)  # inside model.fit
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(timeout=60)  # a bound so the test ends, not a timing assertion
    assert code == 130, (tmp_path / "w.log").read_text()[-2000:]
    _, study = load(path, *overrides)
    assert study.trials[trial.number].state.name == "FAIL"
    assert study.trials[trial.number].user_attrs["error"].startswith("interrupted")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(study.trials[trial.number].user_attrs["mlflow_run_id"]).info.status == "KILLED"
    _, parents, _ = mlflow_runs(tmp_path)
    assert parents[0].info.status == "KILLED"
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # queued again, like a preempted job
    rerun = start_worker(path, *overrides, log=tmp_path / "rerun.log")
    assert rerun.wait(timeout=900) == 0
    _, study = load(path, *overrides)
    # The retry of the interrupted trial, which reaches the total of 1 counted trial.
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    wait_for(healthy, timeout=120, what="the MLflow server")
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _rest(url, endpoint, body=None, query=""):
    """MLflow's REST API: POST with a JSON body, or GET with a query string."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}{query}", data=data,
                                     headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=30))


def test_sweep_logs_to_an_mlflow_server_and_survives_its_loss(tmp_path, mlflow_server, monkeypatch):
    url, server = mlflow_server
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4)"}, settings={"n_trials": 2},
                       overrides=["tracking=server", f"tracking.uri={url}"])
    s = load_sweep(str(path))
    study = engine.optimize(s, show_progress=False)
    assert finish(s, study) == 0

    experiment = _rest(url, "experiments/get-by-name", query="?experiment_name=cnnexp")["experiment"]
    runs = _rest(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("cnnexp.role") == "study"]
    children = [(r, t) for r, t in zip(runs, tags) if "mlflow.parentRunId" in t]
    assert len(parents) == 1 and len(children) == 2
    for run, tag in children:
        assert tag["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        trial = study.trials[int(tag["optuna.trial_number"])]
        assert metrics["final/test_accuracy"] == pytest.approx(trial.user_attrs["test_accuracy"])
        assert "val_accuracy" in metrics

    os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-study
    server.wait()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    s = load_sweep(str(path), ["sweep.n_trials=3"])
    with pytest.warns(UserWarning, match="MLflow"):
        study = engine.optimize(s, show_progress=False)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # nothing lost in the study


@pytest.fixture
def slurm():
    if not os.environ.get("CNNEXP_TEST_SLURM"):
        pytest.skip("no Slurm cluster: start one with `eval \"$(bash .ci/services.sh)\"` (as root)")


def test_slurm_daemons_listen_on_loopback_only(slurm):
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout.splitlines()
    ports = [line.split()[3] for line in listening if line.split()[3].endswith((":6817", ":6818"))]
    assert len(ports) == 2 and all(p.startswith("127.0.0.1:") for p in ports), ports


def test_slurm_array_of_two_workers_on_one_study(tmp_path, slurm):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4,5)"}, settings={"n_trials": 4})
    env = {**os.environ, "WORKERS": "2", "GPUS_PER_WORKER": "0", "CPUS_PER_WORKER": "1",
           "MEM_PER_WORKER": "3G", "TIME": "00:20:00", "SWEEP": str(path), "PYTHON": sys.executable}
    submitted = subprocess.run(["bash", str(PROJECT_ROOT / "sweeps/slurm/submit.sh")], env=env,
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]

    def finished():
        queue = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
        return not queue.strip()

    wait_for(finished, timeout=900, every=2, what=f"Slurm job {job}")
    logs = sorted((PROJECT_ROOT / "outputs" / "slurm").glob(f"*-{job}_*.out"))
    assert len(logs) == 2, logs
    _, study = load(path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4, "\n".join(p.read_text()[-1500:] for p in logs)
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in study.trials}
    assert workers == {"0", "1"}  # both array tasks took trials
    assert_optuna_and_mlflow_agree(study, tmp_path)
    assert (tmp_path / "out" / "tiny" / "summary.md").exists()  # task 0 wrote the report

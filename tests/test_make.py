"""Every command the README tells a user to type, run the way it gives it: `make sweep`, `make run`,
`make sweep SWEEP=quick`, `make report`, `make ui`, `make dashboard`.

Each runs in the project folder (in CI: the clean checkout), with nothing staged in the Keras cache,
its stores and outputs pointed at a temporary folder so that a developer's own studies are never
touched.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from cnnexp import PROJECT_ROOT
from tests.conftest import CIFAR_JPEG

# One xdist group: the module-scoped user folder and quick study are made once, on one worker.
pytestmark = [pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f"{CIFAR_JPEG} is not there"),
              pytest.mark.xdist_group("make")]

QUESTIONS = {"kernel", "width", "train.batch_size", "train.epochs", "task"}


def make(*args: str, env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's environment: nothing staged in the Keras cache, stores in a folder of their own."""
    root = tmp_path_factory.mktemp("user")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MLFLOW_TRACKING_URI")}
    env.update(KERAS_HOME=str(root / "keras-home"), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               PYTHONUNBUFFERED="1")
    return root, env


def where(root: Path) -> str:
    """ARGS that keep a sweep's storage, report and artifacts in the user's folder."""
    return (f"sweep.storage=sqlite:///{root / 'studies.db'} sweep.output_dir={root / 'outputs'} "
            f"tracking.artifact_root={root / 'mlartifacts'}")


# The default study at the smallest design that asks every question: 2 seeds, one look, 500 training images (pinned,
# so no plan is timed: tests/test_design.py times real plans), one epoch (the long arm still trains 4), small
# evaluation and test sets, no confirmation round.
SMALL = ("sweep.budget=null design.seeds=2 answers.looks=1 answers.confirm=false dataset.train_limit=500 "
         "dataset.eval_limit=300 dataset.test_limit=300 train.epochs=1")


def test_make_sweep_runs_the_default_study_to_the_end_with_nothing_staged(user):
    root, env = user
    done = make("sweep", f"ARGS={SMALL} {where(root)}", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    effects = pd.read_csv(root / "outputs" / "seed_questions" / "effects.csv")
    assert QUESTIONS <= set(effects["parameter"]), effects
    study = optuna.load_study(study_name="seed_questions", storage=f"sqlite:///{root / 'studies.db'}")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    notes = (root / "outputs" / "seed_questions" / "summary.md").read_text()
    assert "JPEG" in notes and "t10k" in notes  # the shared copies were found, and the answers say so


def test_make_run_with_a_shortcut_logs_what_the_user_typed(user):
    root, env = user
    done = make("run", "ARGS=+kernel=7 train.epochs=1 dataset.train_limit=1000 dataset.test_limit=500 "
                f"train.optimizer=adam tracking.artifact_root={root / 'mlartifacts'} tracking.log_model=false", env=env,
                timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy: ([\d.]+)", done.stdout)[1])
    assert accuracy > 0.15  # kernel 7, 900 images, one epoch of Adam: chance is 0.10, 4 binomial SDs below
    runs = MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("cnnexp").experiment_id],
        "params.kernel = '7'")
    assert len(runs) == 1 and runs[0].data.params["model.layers_resolved"].startswith("c64k7 c64k7 m2")


@pytest.fixture(scope="module")
def quick(user):
    root, env = user
    done = make("sweep", "SWEEP=quick", f"ARGS=sweep.n_trials=2 sweep.repeats=0 dataset.train_limit=1000 "
                f"dataset.test_limit=300 train.epochs=1 {where(root)}", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, env


def test_make_report_writes_the_report_of_a_study_again(quick):
    root, env = quick
    (root / "outputs" / "quick" / "summary.md").unlink()
    done = make("report", "SWEEP=quick", f"ARGS=--storage sqlite:///{root / 'studies.db'} --out {root / 'outputs'}",
                env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## Answers" in (root / "outputs" / "quick" / "summary.md").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_then_stop(args: list[str], env: dict, url_pattern: str, path: str) -> tuple[str, list[str]]:
    """Start a `make` target that serves, wait for its URL and an answer, SIGTERM make; return the
    URL it printed and any of its processes still alive afterwards."""
    proc = subprocess.Popen(["make", *args], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        printed = ""
        while not re.search(url_pattern, printed):
            line = proc.stdout.readline()
            assert line, f"make {args[0]} ended before printing its URL: {printed}"
            printed += line
        url = re.search(url_pattern, printed)[0]
        base = re.match(r"http://127\.0\.0\.1:\d+", url)[0]
        for _ in range(120):
            try:
                with urllib.request.urlopen(base + path, timeout=5) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"{base}{path} never answered")
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "make started nothing"
        os.kill(proc.pid, signal.SIGTERM)  # what `kill <pid of make>` does; Ctrl-C reaches the same handler
        proc.wait(timeout=60)
        psutil.wait_procs(family, timeout=30)
        return url, [f"{p.pid} {p.name()}" for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_make_ui_prints_the_study_url_serves_it_and_stops_everything_it_started(quick):
    root, env = quick
    url, left = serve_then_stop(["ui", "SWEEP=quick", f"PORT={free_port()}"], env,
                                r"http://127\.0\.0\.1:\d+/#/experiments/\d+/runs\?\S+", "/")
    assert "viewStateShareKey=cnnexp-quick" in url
    assert not left, f"still running after make ui was stopped: {left}"


def test_make_dashboard_prints_the_study_page_serves_it_and_stops(quick):
    root, env = quick
    url, left = serve_then_stop(["dashboard", "SWEEP=quick", f"STORAGE=sqlite:///{root / 'studies.db'}",
                                 f"DASHBOARD_PORT={free_port()}"], env,
                                r"http://127\.0\.0\.1:\d+/dashboard/studies/\d+", "/api/studies")
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / 'studies.db'}")
    assert url.endswith(f"/dashboard/studies/{storage.get_study_id_from_name('quick')}")  # that sweep's, not the latest
    assert not left, f"still running after make dashboard was stopped: {left}"

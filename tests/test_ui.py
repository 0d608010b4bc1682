"""What the user sees: the real MLflow UI and optuna-dashboard over a real tiny sweep, in headless Chromium.

CNNEXP_UI_SCREENSHOTS=1 also saves screenshots (1400x900) in outputs/ui-screenshots/.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnnexp import PROJECT_ROOT
from cnnexp.study import engine, parent
from cnnexp.study.space import load_sweep
from cnnexp.tracking import views
from tests.conftest import run_cli
from tests.test_sweep import mlflow_runs, write_sweep


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, on the model-training sidebar."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


pytestmark = [pytest.mark.ui, pytest.mark.xdist_group("ui")]  # its module-scoped study, once

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", "--virtual-time-budget=15000"]  # the SPA's time to fetch and render
BIN = Path(sys.executable).parent
# The view's columns for a sweep of `kernel`: MLflow's own column ids in the runs table.
VIEW_COLUMNS = {"params.`swept.kernel`", "metrics.`val_accuracy`", "metrics.`final/test_accuracy`",
                "params.`model.num_params`"}


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium): the UI tests need a real browser")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], ready_url: str, log: Path, cwd: Path):
    """Run a server in its own process group until `ready_url` answers; stop that group afterwards."""
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"{command[0]} exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(ready_url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"{ready_url} did not answer:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def browse(url: str, profile: Path, *options: str) -> str:
    """Open `url` in a fresh headless Chromium profile; return what it printed (the DOM with --dump-dom)."""
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *options, url]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as browser:
        try:
            out, err = browser.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.communicate()
            pytest.fail(f"Chromium did not finish with {url}")
    assert browser.returncode == 0, f"Chromium failed on {url}: {err[-2000:]}"
    return out


def text_of(dom: str) -> str:
    """The page's visible words, one element per line."""
    body = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "\n", body))
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def title_of(dom: str) -> str:
    match = re.search(r"<title>(.*?)</title>", dom, flags=re.S)
    return html.unescape(match.group(1)) if match else ""


def table_rows(dom: str) -> list[str]:
    """The run ids of the runs table, top to bottom (ag-grid repeats a row in each pinned section)."""
    rows = {int(i): run for i, run in re.findall(r'role="row" row-index="(\d+)" row-id="([0-9a-f]{32})"', dom)}
    return [rows[i] for i in sorted(rows)]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, cifar_jpeg):
    """A two-trial sweep of `kernel`, its MLflow UI base chosen before the sweep records its URL."""
    root = tmp_path_factory.mktemp("ui")
    port = free_port()
    path = write_sweep(root, {"kernel": "choice(3,5)"},
                       settings={"n_trials": 2, "sampler": {"name": "grid", "seed": 0}, "log_models": "none"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_UI_BASE", f"http://127.0.0.1:{port}")
        loaded = load_sweep(str(path))
        study = engine.optimize(loaded, show_progress=False)
        assert parent.end(study, parent.tracking_uri(loaded))
    client, parents, children = mlflow_runs(root)
    return SimpleNamespace(root=root, path=path, study=study, port=port, base=f"http://127.0.0.1:{port}",
                           client=client, parent=parents[0], children=children,
                           experiment_id=parents[0].info.experiment_id)


@pytest.fixture(scope="module")
def mlflow_ui(tiny_study):
    """`mlflow ui` over the study's store, as `make ui` starts it."""
    s = tiny_study
    command = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{s.root / 'mlflow.db'}",
               "--host", "127.0.0.1", "--port", str(s.port)]
    with serving(command, f"{s.base}/health", s.root / "mlflow-ui.log", cwd=s.root):
        yield s.base


@pytest.fixture(scope="module")
def dashboard(tiny_study):
    """optuna-dashboard over the study storage, started by `make dashboard`'s command; (base, its first line)."""
    s, port = tiny_study, free_port()
    log = s.root / "dashboard.log"
    command = [sys.executable, "-m", "cnnexp.ui", "dashboard", "--storage", f"sqlite:///{s.root / 'studies.db'}",
               "--port", str(port)]
    with serving(command, f"http://127.0.0.1:{port}/api/meta", log, cwd=PROJECT_ROOT):
        yield f"http://127.0.0.1:{port}", log.read_text().splitlines()[0]


def test_trial_runs_carry_their_searched_values_under_short_keys(tiny_study):
    logged = {int(c.data.tags["optuna.trial_number"]): c.data.params.get("swept.kernel") for c in tiny_study.children}
    assert logged == {t.number: str(t.params["kernel"]) for t in tiny_study.study.trials}, (
        "the view's swept.* columns need the objective to call tracking.log_searched(child_run, values)")


def test_the_recorded_url_opens_the_study_runs_best_first_with_its_columns(tiny_study, mlflow_ui, chromium, tmp_path):
    s = tiny_study
    url = s.study.user_attrs["mlflow_ui_url"]
    assert url == (f"{s.base}/#/experiments/{s.experiment_id}/runs?workflowType=machine_learning"
                   "&viewStateShareKey=cnnexp-tiny")
    assert s.parent.data.tags["cnnexp.ui_url"] == url
    dom = browse(url, tmp_path / "profile", "--dump-dom")
    text = text_of(dom)
    assert title_of(dom).startswith("Runs - "), title_of(dom)  # the runs table, not "Overview - " (GenAI)
    assert "Token Usage" not in text and "Tokens per Trace" not in text
    assert "You're viewing a shared view" in text  # MLflow applied the study's view...
    missing = VIEW_COLUMNS - set(re.findall(r'col-id="([^"]+)"', dom))
    assert not missing, f"the view's columns missing from the runs table: {sorted(missing)}"
    best_first = sorted(s.study.trials, key=lambda t: t.value, reverse=True)
    assert table_rows(dom) == [t.user_attrs["mlflow_run_id"] for t in best_first]  # trial runs only, best first
    for trial in best_first:
        assert f"t{trial.number} k{trial.params['kernel']}" in text


def test_run_pages_open_on_their_runs(tiny_study, mlflow_ui, chromium, tmp_path):
    s = tiny_study
    trial = s.study.best_trial
    child = run_url(s.base, s.experiment_id, trial.user_attrs["mlflow_run_id"])
    text = text_of(browse(child, tmp_path / "child", "--dump-dom"))
    assert f"t{trial.number} k{trial.params['kernel']}" in text and "val_accuracy" in text
    text = text_of(browse(run_url(s.base, s.experiment_id, s.parent.info.run_id), tmp_path / "parent", "--dump-dom"))
    assert "study tiny" in text


def test_make_ui_prints_the_study_url_first(tiny_study):
    s = tiny_study
    for which in ([], ["--sweep", str(s.path)], ["--study", "tiny"]):
        done = run_cli("cnnexp.ui", "mlflow-url", "--tracking-uri", f"sqlite:///{s.root / 'mlflow.db'}",
                       "--port", str(s.port), *which, cwd=s.root, env={"MLFLOW_UI_BASE": ""})
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == f"Runs of study 'tiny', best first: {s.study.user_attrs['mlflow_ui_url']}"
    done = run_cli("cnnexp.ui", "mlflow-url", "--tracking-uri", f"sqlite:///{s.root / 'mlflow.db'}",
                   "--study", "nope", cwd=s.root)
    assert done.returncode == 2 and done.stderr.startswith("error: no study 'nope' in the MLflow store"), done.stderr


def test_the_dashboard_shows_the_study_and_its_metric(tiny_study, dashboard, chromium, tmp_path):
    base, first_line = dashboard
    studies = get_json(f"{base}/api/studies")["study_summaries"]
    study_id = next(st["study_id"] for st in studies if st["study_name"] == "tiny")
    assert first_line == f"Study 'tiny' in optuna-dashboard: {base}/dashboard/studies/{study_id}"
    assert get_json(f"{base}/api/studies/{study_id}")["objective_names"] == ["val_accuracy"]
    text = text_of(browse(views.dashboard_url(base, study_id), tmp_path / "profile", "--dump-dom"))
    assert "tiny" in text and "val_accuracy" in text


def test_make_dashboard_without_a_storage_says_run_make_sweep_first(tmp_path):
    done = run_cli("cnnexp.ui", "dashboard", "--storage", f"sqlite:///{tmp_path / 'studies.db'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: no study storage at {tmp_path / 'studies.db'} yet; run `make sweep` "
                                   f"first (STORAGE=sqlite:///{tmp_path / 'studies.db'}).")
    assert not (tmp_path / "studies.db").exists()


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(not os.environ.get("CNNEXP_UI_SCREENSHOTS"), reason="set CNNEXP_UI_SCREENSHOTS=1 to save them")
def test_screenshots(tiny_study, mlflow_ui, dashboard, chromium, tmp_path):
    s, (dashboard_base, _) = tiny_study, dashboard
    studies = get_json(f"{dashboard_base}/api/studies")["study_summaries"]
    pages = {
        "mlflow-study-runs": s.study.user_attrs["mlflow_ui_url"],
        "mlflow-child-run": run_url(s.base, s.experiment_id, s.study.best_trial.user_attrs["mlflow_run_id"]),
        "mlflow-parent-run": run_url(s.base, s.experiment_id, s.parent.info.run_id),
        "dashboard-study": views.dashboard_url(dashboard_base, studies[0]["study_id"]),
    }
    out = PROJECT_ROOT / "outputs" / "ui-screenshots"
    out.mkdir(parents=True, exist_ok=True)
    for name, url in pages.items():
        shot = tmp_path / f"{name}.png"
        browse(url, tmp_path / name, f"--screenshot={shot}")
        assert png_size(shot) == (1400, 900)
        shutil.copy(shot, out / shot.name)

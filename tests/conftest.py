"""Shared fixtures: offline, isolated caches and stores, the shared CIFAR-10 image tree."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cnnexp import PROJECT_ROOT

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"


@contextlib.contextmanager
def cpu_share(alone: bool):
    """Under `make test`'s xdist workers, a test marked `alone` (it measures CPU or wall time) runs with no other test
    beside it: every other test holds a shared lock, it an exclusive one, and a turnstile lets no new test start while
    it waits. Without xdist, nothing to do."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    base = Path(tempfile.gettempdir()) / f"cnnexp-tests-{run}"
    with open(f"{base}.turnstile", "a") as gate, open(f"{base}.cpu", "a") as cpu:
        fcntl.flock(gate, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        fcntl.flock(cpu, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(cpu, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Around setup, call and teardown: a module-scoped fixture made for this test counts as part of it.
    with cpu_share(alone=item.get_closest_marker("alone") is not None):
        return (yield)


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """No test reads the user's Keras cache, writes to their MLflow store or touches the network."""
    root = tmp_path_factory.mktemp("env")
    saved = {k: os.environ.get(k) for k in ("KERAS_HOME", "CNNEXP_CACHE_DIR", "MLFLOW_TRACKING_URI")}
    os.environ["KERAS_HOME"] = str(root / "keras-home")  # empty: nothing staged there
    # One decode cache for the session: the shared tree is decoded once, not per test.
    os.environ["CNNEXP_CACHE_DIR"] = str(root / "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def fresh_process_caches():
    """Each test starts with the per-process caches empty: what one test learnt of a store never leaks to the next."""
    from cnnexp import stop, stores
    from cnnexp.data import cache
    from cnnexp.tracking import runs, store

    for memo in (store.CONTACTS, runs.WARNED, cache.FOLDERS, stores.ENGINES):
        memo.clear()
    stop.REQUESTED.clear()  # a stop heard in an earlier test never ends this one's training
    yield
    if "keras" in sys.modules:  # a test that trained under another dtype policy leaves float32 behind it
        sys.modules["keras"].mixed_precision.set_global_policy("float32")


@pytest.fixture(autouse=True)
def signals_left_as_found():
    """After every test: the stop signals are handled as before it. An ignored SIGTERM is inherited by every process
    started later (a `make` that can't be stopped), so code that ignores signals must give them back."""
    import signal

    watched = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in watched}
    yield
    after = {s: signal.getsignal(s) for s in watched}
    for s, handler in before.items():
        signal.signal(s, handler)  # the next tests run as they would alone
    changed = {signal.Signals(s).name: str(after[s]) for s in watched if after[s] != before[s]}
    assert not changed, f"the test left stop signals handled otherwise: {changed}"


@pytest.fixture(autouse=True)
def reports_say_what_their_numbers_say(tmp_path):
    """After every test: each report it wrote has verdicts its own numbers support (an `effect` row's CI excludes 0,
    an `equivalent` row's lies within +-margin)."""
    yield
    import pandas as pd

    from cnnexp.reporting.write import inconsistent

    for path in tmp_path.rglob("effects.csv"):
        bad = inconsistent(pd.read_csv(path), margin=_margin_of(path))
        assert not bad, f"{path}: {bad}"


def _margin_of(effects_csv: Path) -> float:
    """The margin a report was written with, as its summary states it (default 0.015)."""
    import re

    summary = effects_csv.with_name("summary.md")
    found = (re.search(r"within \+-([0-9.]+) points \(answers.margin\)", summary.read_text())
             if summary.exists() else None)
    return float(found[1]) / 100 if found else 0.015


@pytest.fixture(scope="session")
def cifar_jpeg() -> Path:
    if not CIFAR_JPEG.exists():
        pytest.skip(f"{CIFAR_JPEG} is not there (see ../shared/data/README.md)")
    return CIFAR_JPEG


def folder_overrides(path: Path, train_limit: int = 2000, test_limit: int = 500) -> list[str]:
    """A small, stratified subset of the real CIFAR-10 images."""
    return [
        "dataset=folder", f"dataset.path={path}", f"dataset.train_limit={train_limit}",
        f"dataset.test_limit={test_limit}",
    ]


def tracking_overrides(tmp_path: Path, log_model: bool = False) -> list[str]:
    return [
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_root={tmp_path / 'mlartifacts'}",
        f"tracking.log_model={str(log_model).lower()}",
    ]


def make_cifar10_archive(folder: Path, per_batch: int = 50, seed: int = 0) -> Path:
    """A small archive in the standard CIFAR-10 python layout (cifar-10-python.tar.gz)."""
    rng = np.random.default_rng(seed)
    src = folder / "cifar-10-batches-py"
    src.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(src / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return archive


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 900, env: dict | None = None):
    """Run `python -m <module> args` as a user would, and return the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )

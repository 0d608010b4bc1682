"""Hostile inputs, round 2: each builds its own input and checks what the user sees.

The promises (README, "Security and failure modes"): no code runs from a data file; tracking never
decides whether training happens; bad input gets one clear line (`error: ...`, exit 2, no
traceback), is refused before anything is created, and loses nothing already done.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from cnnexp.config import compose_config
from cnnexp.data import load, locate
from cnnexp.errors import ConfigError, DataError
from cnnexp.study import engine
from cnnexp.study.optuna_study import open_study
from cnnexp.study.space import load_sweep
from tests.conftest import CIFAR_JPEG, run_cli, tracking_overrides
from tests.helpers import TINY, finish, write_sweep

needs_cifar = pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f"{CIFAR_JPEG} is not there")


def one_line_error(proc: subprocess.CompletedProcess, *wanted: str) -> str:
    """Exit 2, one `error:` line naming what is wrong, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in wanted:
        assert text in errors[0], errors[0]
    return errors[0]


def sweep_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("cnnexp.sweep", *args, cwd=tmp_path, timeout=600)


@contextlib.contextmanager
def read_only_copy(source: Path, where: Path):
    """`source` copied onto a tmpfs that is then remounted read-only (root only; skipped where mounting isn't
    allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("can't mount a tmpfs here (needs root)")
    try:
        (where / source.name).write_bytes(source.read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where / source.name
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextlib.contextmanager
def full_disk(where: Path, size: str = "512k"):
    """A tiny tmpfs, filled to the last byte (root only; the test is skipped where mounting isn't allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("can't mount a tmpfs here (needs root)")
    try:
        with contextlib.suppress(OSError), open(where / "filler", "wb") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# --- 1. study names that would escape the output folder ---------------------------------------------

@pytest.mark.parametrize("name", ["../../escape", "/tmp/abs-escape", "a/b", "..", "x" * 101, "has space"])
def test_a_study_name_that_is_not_a_safe_folder_name_is_refused_before_anything_is_created(tmp_path, name):
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"})
    proc = sweep_cli(tmp_path, "--sweep", str(path), f"sweep.study_name={name}")
    one_line_error(proc, "sweep.study_name=", "may hold only letters, digits")
    assert not (tmp_path / "studies.db").exists() and not (tmp_path / "out").exists()
    assert not Path("/tmp/abs-escape").exists() and not (tmp_path.parent.parent / "escape").exists()
    assert one_line_error(run_cli("cnnexp.report", name, "--storage", f"sqlite:///{tmp_path / 'studies.db'}",
                                  cwd=tmp_path), "may hold only letters")


# --- 2, 3, 6. sweep files and command lines that would fail only after training ---------------------------

@pytest.mark.parametrize(("params", "args", "wanted"), [
    ({"kernel": "choice()"}, [], "params.kernel='choice()' is not a valid sweep expression"),
    ({"kernel": "range(5,1)"}, [], "params.kernel='range(5,1)' is empty"),
    ({"train.lr": "interval(1,0)"}, [], "params.train.lr='interval(1,0)' is empty"),
    ({"train.lr": "tag(log, interval(0,1))"}, [], "a log interval needs low > 0"),
    ({"kernel": "choice(3,5)"}, ["sweep.n_trials=abc"], "sweep.n_trials='abc' must be an integer"),
    ({"kernel": "choice(3,5)"}, ["sweep.n_trials=0"], "sweep.n_trials=0 must be >= 1"),
    ({"kernel": "choice(3,5)"}, ["sweep.n_trials=-1"], "sweep.n_trials=-1 must be >= 1"),
    ({"kernel": "choice(3,5)"}, ["kernel=choice(3,"], "command-line override 'kernel=choice(3,' is not valid"),
    ({"kernel": "choice(3,5)"}, ["sweep.nonsense=1"], "Unknown setting 'sweep.nonsense'"),
    ({"kernel": "choice(3,5)"}, ["sweep.log_models=some"], "sweep.log_models='some' must be one of best"),
    ({"kernel": "choice(3,5)"}, ["sweep.budget=soon"], "sweep.budget='soon' must be a positive duration"),
    ({"kernal": "choice(3,5)"}, [], "Did you mean 'kernel'?"),
    ({"kernel": "choice(3,0)"}, [], "the trial kernel=0 can't run: +kernel=0 must be >= 1"),
    ({"kernel": "choice(3,5)"}, ["dataset.train_limit=5"], "the smallest dataset.train_limit that works is 95"),
])
def test_a_bad_sweep_is_one_line_before_any_study_exists(tmp_path, params, args, wanted):
    path = write_sweep(tmp_path, params)
    one_line_error(sweep_cli(tmp_path, "--sweep", str(path), *args), wanted)
    if (tmp_path / "studies.db").exists():
        assert not optuna.get_all_study_names(f"sqlite:///{tmp_path / 'studies.db'}")


def test_a_typo_never_leaves_a_study_unusable_the_fixed_file_runs_under_the_same_name(tmp_path):
    one_line_error(sweep_cli(tmp_path, "--sweep", str(write_sweep(tmp_path, {"kernal": "choice(3,5)"}))))
    fixed = load_sweep(str(write_sweep(tmp_path, {"kernel": "choice(3,5)"})))
    assert open_study(fixed.settings, fixed.space, fixed.expressions).trials == []  # nothing was spent


# --- 4. the same study name with another search space ------------------------------------------------------

def test_the_same_study_name_with_another_search_space_is_refused_before_the_first_trial(tmp_path):
    first = load_sweep(str(write_sweep(tmp_path, {"kernel": "choice(3,5)"})))
    open_study(first.settings, first.space, first.expressions)
    proc = sweep_cli(tmp_path, "--sweep", str(write_sweep(tmp_path, {"kernel": "choice(2,7)"})))
    one_line_error(proc, "The study 'tiny' exists in", "another search space (kernel: choice(3,5))",
                   "sweep.study_name=tiny-2")


# --- 5. budgets that can't fit -----------------------------------------------------------------------------

@needs_cifar
def test_a_budget_that_cannot_fit_says_the_smallest_that_would(tmp_path):
    tree = tmp_path / "tiny-tree"
    for split, count in (("train", 10), ("test", 4)):
        for label in ("a", "b"):
            (tree / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (i * 20, 0, 0) if label == "a" else (0, 0, i * 20)).save(
                    tree / split / label / f"{i}.png")
    doc = {"overrides": ["dataset=folder", f"dataset.path={tree}", "model.layers.8.units=2", "train.batch_size=100",
                         *tracking_overrides(tmp_path)],
           "design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}},
           "sweep": {"budget": "1s", "storage": f"sqlite:///{tmp_path / 'studies.db'}",
                     "output_dir": str(tmp_path / "o")}}
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump(doc))
    one_line_error(sweep_cli(tmp_path, "--sweep", str(tmp_path / "budget.yaml")), "can't fit this study",
                   "give sweep.budget=")


# --- 7, 8. values a single run would choke on ------------------------------------------------------------

@pytest.mark.parametrize(("args", "wanted"), [
    (["+width=nan"], "+width=nan must be a finite number"), (["+width=inf"], "+width=inf must be a finite number"),
    (["+kernel=2.5"], "+kernel=2.5 must be an integer"),
    (["dataset.train_limit=5"], "the smallest dataset.train_limit that works is 95"),
    (["dataset.train_limit=5", "dataset.eval_limit=100"], "the smallest dataset.train_limit that works is 10"),
    (["train.schedule.name=cyclic"], "train.schedule.name='cyclic' must be one of"),
])
def test_a_bad_value_for_one_run_is_one_line(tmp_path, args, wanted):
    one_line_error(run_cli("cnnexp.run", *args, cwd=tmp_path), wanted)


def test_a_folder_subset_too_small_for_its_classes_says_the_smallest_that_works(tmp_path):
    tree = tmp_path / "t"
    for label in "abc":
        (tree / label).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tree / label / f"{i}.png")
    cfg = compose_config(["dataset=folder", f"dataset.path={tree}", "dataset.train_limit=10",
                          f"dataset.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(DataError, match="the smallest dataset.train_limit that works is 26"):
        load.load_dataset(cfg.dataset, 0.1)


# --- 9, 10, 11. image trees: 16-bit pixels, a changed structure under a warm cache, links out of the tree ----

def _png16(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_16_bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
    tree = tmp_path / "gray"
    for label, level in (("dark", 2000), ("light", 60000)):
        (tree / label).mkdir(parents=True)
        for i in range(5):
            (tree / label / f"{i}.png").write_bytes(_png16(np.full((8, 8), level + i)))
    raw = load.load_raw(compose_config(["dataset=folder", f"dataset.path={tree}", "dataset.input_shape=[8,8,1]",
                                        f"dataset.cache_dir={tmp_path / 'c'}", "model=mnist_cnn"]).dataset)
    pixels = np.concatenate([raw.x_train, raw.x_test])
    labels = np.concatenate([raw.y_train, raw.y_test])
    assert pixels[labels == 0].max() < 20 and pixels[labels == 1].min() > 220  # 2000/257 ~ 8, 60000/257 ~ 233


def _tree(root: Path) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 30, 10, 10)).save(root / label / f"{i}.png")
    return root


def test_an_empty_class_folder_added_under_a_warm_cache_is_refused_as_when_cold(tmp_path):
    tree = _tree(tmp_path / "pets")
    cfg = compose_config(["dataset=folder", f"dataset.path={tree}", f"dataset.cache_dir={tmp_path / 'c'}"]).dataset
    assert load.load_raw(cfg).class_names == ["cat", "dog"]  # the listing is cached now
    (tree / "zebra").mkdir()
    with pytest.raises(DataError, match=r"Class folder .*zebra/ holds no images"):
        load.load_raw(cfg)


def test_links_are_never_followed_not_even_to_fingerprint(tmp_path):
    tree = _tree(tmp_path / "pets")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret" * 1000)
    (tree / "cat" / "link.png").symlink_to(outside)
    before = locate.fingerprint_path(tree)
    outside.write_bytes(b"changed" * 2000)  # the target changes; the tree does not
    assert locate.fingerprint_path(tree) == before
    (tree / "cat" / "link.png").unlink()
    (tree / "cat" / "link.png").symlink_to(tmp_path / "elsewhere")  # the link itself changes: so does the tree
    assert locate.fingerprint_path(tree) != before
    raw = load.load_raw(compose_config(["dataset=folder", f"dataset.path={tree}",
                                        f"dataset.cache_dir={tmp_path / 'c'}", "dataset.max_bad_fraction=0.5"]).dataset)
    assert "cat/link.png" in next(iter(raw.skipped)) and "not a regular file" in next(iter(raw.skipped.values()))


# --- 12. an IDX gzip bomb --------------------------------------------------------------------------------------

def test_an_idx_file_that_declares_gigabytes_is_refused_from_its_header(tmp_path):
    folder = tmp_path / "mnist-t10k"
    folder.mkdir()
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as handle:  # 10 million 28x28 images, declared
        handle.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 10_000_000, 28, 28) + b"\0" * 1_000_000)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + bytes(10))
    cfg = compose_config(["dataset=mnist", f"dataset.path={folder}", f"dataset.cache_dir={tmp_path / 'c'}",
                          "model=mnist_cnn"]).dataset
    with pytest.raises(DataError, match=r"declares 10000000x28x28 = 7,840,000,000 bytes"):
        load.load_raw(cfg)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as handle:  # a header that isn't one
        handle.write(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="is not an idx file of unsigned bytes"):
        load.load_raw(cfg)


# --- 13, 14. full disks under the checkpoints and the MLflow artifacts ----------------------------------------

@needs_cifar
def test_a_checkpoint_folder_on_a_full_disk_costs_a_warning_not_the_trial(tmp_path):
    with full_disk(tmp_path / "full") as disk:
        path = write_sweep(tmp_path, {"kernel": "choice(3)"}, settings={"n_trials": 1, "checkpoint_dir": str(disk)})
        s = load_sweep(str(path))
        with pytest.warns(UserWarning, match="checkpoint could not be written"):
            study = engine.optimize(s, show_progress=False)
        (trial,) = study.trials
        assert trial.state.name == "COMPLETE" and trial.value > 0.12
        assert "OSError" in trial.user_attrs["checkpoint_error"] or "No space" in trial.user_attrs["checkpoint_error"]


@needs_cifar
def test_an_artifact_store_on_a_full_disk_never_leaves_a_run_running_or_fails_a_finished_one(tmp_path):
    with full_disk(tmp_path / "full") as disk:
        path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, settings={"n_trials": 2, "sampler": {"name": "grid"}},
                           overrides=[f"tracking.artifact_root={disk / 'mlartifacts'}"])
        s = load_sweep(str(path))
        with pytest.warns(UserWarning, match="MLflow"):
            study = engine.optimize(s, show_progress=False)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        finish(s, study)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}  # the parent too: never RUNNING, never FAILED
    assert any("cnnexp.tracking_error" in r.data.tags for r in runs)  # what could not be logged is said


# --- 15. SIGTERM while the report is written ------------------------------------------------------------------

@needs_cifar
def test_an_interrupted_report_ends_the_parent_run_and_leaves_no_half_report(tmp_path, monkeypatch, capsys):
    from cnnexp.reporting import write as writer
    from cnnexp.sweep import report

    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, settings={"n_trials": 1})
    s = load_sweep(str(path))
    study = engine.optimize(s, show_progress=False)
    assert report(s, study) == 0
    out = tmp_path / "out" / "tiny"
    complete = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def interrupted(*args, **kwargs):  # SIGTERM lands while the plots are drawn: our handler raises
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(writer, "plot_all", interrupted)
    assert report(s, study) == 130
    assert "interrupted while writing the report" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == complete  # the previous report, whole
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no half-written folder left
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"


# --- 16, 17. study storages that are damaged, foreign, or on a full disk ------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_a_damaged_or_foreign_storage_is_one_line_and_never_written_to(tmp_path, damage):
    db = tmp_path / "studies.db"
    if damage == "garbage":
        db.write_bytes(os.urandom(8192))
    else:
        import sqlite3

        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE notes (text)" if damage == "foreign" else "CREATE TABLE studies (x)")
            con.executemany("INSERT INTO " + ("notes" if damage == "foreign" else "studies") + " VALUES (?)",
                            [("x" * 500,)] * 200)
        if damage == "truncated":
            db.write_bytes(db.read_bytes()[:5000])
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"})
    one_line_error(sweep_cli(tmp_path, "--sweep", str(path)), f"{db}")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_a_storage_on_a_full_disk_is_one_line(tmp_path):
    with full_disk(tmp_path / "full") as disk:
        path = write_sweep(tmp_path, {"kernel": "choice(3,5)"},
                           settings={"storage": f"sqlite:///{disk / 'studies.db'}"})
        one_line_error(sweep_cli(tmp_path, "--sweep", str(path)), "sweep.storage")


def test_sweep_settings_from_the_file_are_checked_like_the_command_line(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, settings={"grace_period": 5, "heartbeat_interval": 10})
    one_line_error(sweep_cli(tmp_path, "--sweep", str(path)), "sweep.grace_period=5 must be >= 11")
    assert OmegaConf.is_config(load_sweep(str(write_sweep(tmp_path, {"kernel": "choice(3,5)"}))).settings)


# === Round 3 =====================================================================================================
# --- 1. no code from any file or override -----------------------------------------------------------------------

PROBE = "from pathlib import Path\nPath(__file__).with_name('PROBE-RAN').write_text(__name__)\n"


def test_no_module_in_the_working_folder_runs_from_any_entry_point_and_hydra_keys_are_refused(tmp_path):
    # hostile_probe is what hydra.searchpath=[pkg://...] would import; the others shadow libraries the CLIs
    # import later (python -m puts the working folder first on sys.path).
    for name in ("hostile_probe", "yaml", "tqdm", "pynvml", "optuna_dashboard", "matplotlib"):
        (tmp_path / f"{name}.py").write_text(PROBE)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    settings = {"storage": storage, "output_dir": str(tmp_path / "out")}
    bundles = {"file.yaml": {"overrides": ["hydra.searchpath=[pkg://hostile_probe]"],
                             "params": {"kernel": "choice(3,5)"}},
               "key.yaml": {"params": {"hydra.searchpath": "choice([pkg://hostile_probe])"}},
               "arm.yaml": {"design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]},
                                       "arms": {"x": ["hydra.searchpath=[pkg://hostile_probe]"]}}}}
    for name, doc in bundles.items():
        (tmp_path / name).write_text(yaml.safe_dump({**doc, "sweep": settings}))
    refused = "is refused: hydra.* keys"
    cases = [
        (["cnnexp.run", "hydra.searchpath=[pkg://hostile_probe]"], refused),
        (["cnnexp.run", "++hydra.job.chdir=true"], refused),
        (["cnnexp.run", "hydra/launcher=basic"], refused),
        (["cnnexp.run", "dataset@hydra=cifar10"], refused),
        (["cnnexp.run", "--experimental-rerun", "config.pickle"], "is not an option of python -m cnnexp.run"),
        (["cnnexp.run", "--config-dir", "."], "is not an option of python -m cnnexp.run"),
        (["cnnexp.sweep", "--sweep", "file.yaml"], "file.yaml: overrides: 'hydra.searchpath"),
        (["cnnexp.sweep", "--sweep", "key.yaml"], "key.yaml: the key 'hydra.searchpath' " + refused),
        (["cnnexp.sweep", "--sweep", "arm.yaml"], "design.arms.x: 'hydra.searchpath"),
        (["cnnexp.sweep", "--sweep", "file.yaml", "+hydra.searchpath=[pkg://hostile_probe]"], "hydra.searchpath"),
        (["cnnexp.report", "tiny", "--storage", storage], "no study storage at"),
        (["cnnexp.ui", "mlflow-url", "--sweep", "file.yaml", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], None),
    ]
    for args, wanted in cases:
        proc = run_cli(*args, cwd=tmp_path)
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        if wanted is not None:
            one_line_error(proc, wanted)
        assert not (tmp_path / "PROBE-RAN").exists(), (args, (tmp_path / "PROBE-RAN").read_text())
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "out").exists()


# --- 2. every exit ends every run ------------------------------------------------------------------------------

def _mlflow_statuses(tmp_path: Path) -> dict[str, str]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnexp")
    found = client.search_runs([experiment.experiment_id]) if experiment else []
    return {r.info.run_name: r.info.status for r in found}


def _start(tmp_path: Path, module: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _signal_when(proc: subprocess.Popen, marker: str, sig: int, timeout: float = 300) -> tuple[str, str]:
    """Send `sig` once `marker` shows on stdout; then (stdout, stderr) as the process ends."""
    seen, started = [], time.monotonic()
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
        assert time.monotonic() - started < timeout, "".join(seen)[-2000:]
    out, err = proc.communicate(timeout=120)
    return "".join(seen) + out, err


@needs_cifar
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_in_epoch_2_ends_a_single_run_killed_in_one_line(tmp_path, sig):
    args = [*(o for o in TINY if not o.startswith("train.epochs")), "train.epochs=4", "train.verbose=2",
            *tracking_overrides(tmp_path), f"output_dir={tmp_path / 'o'}"]
    out, err = _signal_when(_start(tmp_path, "cnnexp.run", *args), "Epoch 2/", sig)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and "stopped" in errors[0], err[-2000:]
    assert list(_mlflow_statuses(tmp_path).values()) == ["KILLED"]


@needs_cifar
def test_sighup_during_the_trials_fails_and_requeues_the_trial_and_kills_every_run(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, settings={"n_trials": 2},
                       overrides=["train.epochs=4", "train.verbose=0"])
    proc = _start(tmp_path, "cnnexp.sweep", "--sweep", str(path))
    out, err = _signal_when(proc, "epoch 1/4", signal.SIGHUP)
    assert proc.returncode == 130 and "Traceback" not in err and "error: stopped (SIGHUP)" in err, err[-2000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # queued again, to resume from its checkpoint
    assert "interrupted" in study.trials[0].user_attrs["error"]
    assert set(_mlflow_statuses(tmp_path).values()) == {"KILLED"}  # the trial's run and the parent


@needs_cifar
def test_a_stop_during_the_plans_timing_is_heard_within_a_batch(tmp_path):
    doc = {"overrides": [*TINY, *tracking_overrides(tmp_path)],
           "design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}},
           "sweep": {"budget": "30m", "storage": f"sqlite:///{tmp_path / 'studies.db'}",
                     "output_dir": str(tmp_path / "o")}}
    (tmp_path / "planned.yaml").write_text(yaml.safe_dump(doc))
    proc = _start(tmp_path, "cnnexp.sweep", "--sweep", "planned.yaml")
    started = time.monotonic()
    out, err = _signal_when(proc, "Timing each configuration", signal.SIGINT)
    assert proc.returncode == 130 and "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert time.monotonic() - started < 120  # never the 2 minutes of timing the old planner went on with
    assert not [status for status in _mlflow_statuses(tmp_path).values() if status == "RUNNING"]


@needs_cifar
def test_a_closed_pipe_never_fails_a_trial_or_the_sweep_and_the_parent_is_ended(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, settings={"n_trials": 2, "sampler": {"name": "grid"}})
    proc = _start(tmp_path, "cnnexp.sweep", "--sweep", str(path))
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -n 1` does
    proc.wait(timeout=600)
    err = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert set(_mlflow_statuses(tmp_path).values()) == {"FINISHED"}


@needs_cifar
def test_no_report_workers_end_the_parent_and_a_late_worker_never_reopens_it(tmp_path):
    from cnnexp import sweep as sweep_cli_module

    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, settings={"n_trials": 1})
    assert sweep_cli_module.main(["--sweep", str(path), "--no-report"]) == 0
    parent = [status for name, status in _mlflow_statuses(tmp_path).items() if name == "study tiny"]
    assert parent == ["FINISHED"]  # the last worker ended it
    assert sweep_cli_module.main(["--sweep", str(path), "--no-report"]) == 0  # a late array task
    assert set(_mlflow_statuses(tmp_path).values()) == {"FINISHED"}


@needs_cifar
def test_a_stop_during_the_champion_ends_the_parent_killed_with_one_line(tmp_path, monkeypatch, capsys):
    from cnnexp import sweep as sweep_cli_module
    from cnnexp.study import parent

    path = write_sweep(tmp_path, {"kernel": "choice(3)"},
                       settings={"n_trials": 1, "objectives": [{"metric": "train_seconds", "direction": "minimize"}]})

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(parent, "register_champion", stopped)
    assert sweep_cli_module.main(["--sweep", str(path)]) == 130
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped" in errors[0]
    assert _mlflow_statuses(tmp_path)["study tiny"] == "KILLED"


def test_ending_a_run_waits_for_a_store_locked_by_another_program(tmp_path):
    import sqlite3
    import threading

    from cnnexp.config import compose_config
    from cnnexp.tracking import runs

    cfg = compose_config(tracking_overrides(tmp_path))
    run = runs.open_run(cfg.tracking, "locked", {})
    held = sqlite3.connect(tmp_path / "mlflow.db", timeout=1, check_same_thread=False)
    held.execute("BEGIN EXCLUSIVE")  # another program holds the store, longer than MLflow's 20 s busy timeout
    threading.Timer(25, held.rollback).start()
    run.end("FINISHED")
    held.close()
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.run_id).info.status == "FINISHED"


# --- 3. a study keeps one regime ----------------------------------------------------------------------------------

def test_a_rerun_that_measures_another_regime_is_refused_naming_the_keys_and_the_new_name(tmp_path):
    first = load_sweep(str(write_sweep(tmp_path, {"kernel": "choice(3,5)"})))
    open_study(first.settings, first.space, first.expressions, regime=first.regime())
    again = load_sweep(str(tmp_path / "tiny.yaml"), ["sweep.metric=test_accuracy", "train.epochs=1"])
    with pytest.raises(ConfigError, match=r"measured another regime \(epochs: 2 there, 1 now; metric: val_accuracy "
                                          r"there, test_accuracy now; train.epochs: 2 there, 1 now\).*tiny-2"):
        open_study(again.settings, again.space, again.expressions, regime=again.regime())
    # Where things are and how much is printed are not the regime: a worker elsewhere joins.
    moved = load_sweep(str(tmp_path / "tiny.yaml"), [f"dataset.cache_dir={tmp_path / 'other'}", "train.verbose=0"])
    open_study(moved.settings, moved.space, moved.expressions, regime=moved.regime())


# --- 4. validate before creating ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "wanted"), [
    (["sweep.sampler.n_startup_trials=abc"], "sweep.sampler.n_startup_trials='abc' must be int"),
    (["sweep.pruner.name=median", "sweep.pruner.n_startup_trials=-1"], "sweep.pruner: Number of startup trials"),
    (["sweep.sampler.n_startups=3"], "sweep.sampler.n_startups: TPESampler takes no such option"),
    (["answers.precision=0.02"], "answers.precision is now answers.margin"),
])
def test_sampler_and_pruner_options_are_checked_before_any_storage_or_folder_exists(tmp_path, monkeypatch, capsys,
                                                                                    args, wanted):
    from cnnexp import sweep as sweep_cli_module

    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"})
    assert sweep_cli_module.main(["--sweep", str(path), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and wanted in errors[0], errors
    assert not (tmp_path / "studies.db").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "checkpoints").exists()


@needs_cifar
def test_a_trial_that_cannot_be_prepared_fails_with_its_own_reason_and_does_not_count(tmp_path, monkeypatch, capsys):
    from cnnexp import sweep as sweep_cli_module
    from cnnexp.study import objective

    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, settings={"n_trials": 2})

    def broken(*args, **kwargs):
        raise TypeError("a sampler option of the wrong type")

    monkeypatch.setattr(objective, "suggest", broken)
    assert sweep_cli_module.main(["--sweep", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not be prepared: TypeError: a sampler option of the wrong type" in errors[0]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    (trial,) = study.trials  # the sweep stopped on it instead of failing every trial the same way
    assert trial.state.name == "FAIL" and "worker lost" not in trial.user_attrs["error"]
    from cnnexp.study.optuna_study import count_trials

    assert count_trials(study.trials) == 0  # the fixed rerun still has its 2 trials


# --- 5. read-only means read-only ---------------------------------------------------------------------------------

@needs_cifar
def test_the_report_reads_a_read_only_study_writes_only_where_told_and_never_to_a_store_the_study_names(tmp_path):
    from cnnexp import record
    from cnnexp import report as report_cli

    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, settings={"n_trials": 1})
    study = engine.optimize(load_sweep(str(path)), show_progress=False)
    elsewhere = tmp_path / "planted" / "mlflow.db"
    record.write_study(study, mlflow_tracking_uri=f"sqlite:///{elsewhere}")  # a studies file naming another store
    before = hashlib.sha256((tmp_path / "studies.db").read_bytes()).hexdigest()
    with read_only_copy(tmp_path / "studies.db", tmp_path / "ro") as mounted:  # root: chmod alone would not stop it
        storage = f"sqlite:///{mounted}"
        assert report_cli.main(["tiny", "--storage", storage, "--out", str(tmp_path / "report")]) == 0
        assert (tmp_path / "report" / "tiny" / "summary.md").exists() and not elsewhere.parent.exists()
        assert hashlib.sha256(mounted.read_bytes()).hexdigest() == before
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    (tmp_path / "a-file").write_text("x")
    proc = run_cli("cnnexp.report", "tiny", "--storage", storage, "--out", str(tmp_path / "a-file"), cwd=tmp_path)
    one_line_error(proc, "--out: can't write to")
    for missing in ("nosuch", f"sqlite:///{tmp_path / 'typo' / 'studies.db'}"):
        args = ["nosuch", "--storage", storage] if missing == "nosuch" else ["tiny", "--storage", missing]
        one_line_error(run_cli("cnnexp.report", *args, cwd=tmp_path))
    assert not (tmp_path / "typo").exists() and not (tmp_path / "outputs").exists()


# --- 6. every value checked, one line naming the key and the value, before anything is created ----------------------

MNIST_T10K = CIFAR_JPEG.parent / "mnist-t10k"
needs_mnist = pytest.mark.skipif(not MNIST_T10K.exists(), reason=f"{MNIST_T10K} is not there")
# A few hundred real digits, one epoch: seconds on 2 cores.
TINY_MNIST = ["dataset=mnist", f"dataset.path={MNIST_T10K}", "model=mnist_cnn", "dataset.train_limit=200",
              "dataset.test_limit=100", "train.epochs=1"]
FOLDER_HERE = ["dataset=folder", "dataset.path=."]  # config checks come before the folder is looked at


def main_error(main, argv: list[str], capsys, *wanted: str) -> str:
    """A CLI's main(argv) in this process: exit 2, one `error:` line naming what is wrong, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err[-3000:])
    for text in wanted:
        assert text in errors[0], errors[0]
    return errors[0]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(("args", "wanted"), [
    (["dataset.input_shape=[a,32,3]"], "dataset.input_shape=['a', 32, 3] must be [height, width, channels]"),
    (["dataset.input_shape=[32,32]"], "dataset.input_shape=[32, 32] must be [height, width, channels]"),
    (["dataset.input_shape=[32,32,2]"], "channels 1 (grayscale) or 3 (RGB)"),
    (["dataset.subset_seed=-1"], "dataset.subset_seed=-1 must be >= 0"),
    (["dataset.subset_seed=4294967296"], "dataset.subset_seed=4294967296 must be <= 4294967295"),
    ([*FOLDER_HERE, "dataset.test_fraction=abc"], "dataset.test_fraction='abc' must be a number"),
    ([*FOLDER_HERE, "dataset.test_fraction=0"], "dataset.test_fraction=0 must be > 0"),
    (["train.seed=4294967296"], "train.seed=4294967296 must be <= 4294967295"),
    (["train.data_seed=-1"], "train.data_seed=-1 must be >= 0"),
    ([*FOLDER_HERE, "dataset.input_shape=[8,8,3]", "train.augment.translate=10"],
     "train.augment.translate=10 must be < 8, the smaller side of the 8x8 images"),
    (["tracking.timeout=0"], "tracking.timeout=0 must be > 0"),
    (["tracking.telemetry=maybe"], "tracking.telemetry='maybe' must be true or false"),
    (["kernel=7"], "kernel is a shortcut, not a config key: write +kernel=7"),
    (["dataset=nosuch"], "available options in 'dataset': cifar10, fashion_mnist, folder, mnist"),
    (["+width=0.5", "+width=0.25"], "width is given twice"),
    (["+tracking.timeout=5"], "tracking.timeout is a config key already: write tracking.timeout=5 without '+'"),
])
def test_a_bad_value_for_a_run_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, wanted):
    from cnnexp import run

    monkeypatch.chdir(tmp_path)
    main_error(run.main, args, capsys, wanted)
    assert files_under(tmp_path) == set()  # no outputs/runs/<time>, no mlflow.db


@pytest.mark.parametrize(("args", "wanted"), [
    (["kernel=7"], "write +kernel=7"),
    (["dataset=nosuch"], "available options in 'dataset'"),
    (["+tracking.timeout=5"], "write tracking.timeout=5 without '+'"),
    (["dataset.subset_seed=-1"], "dataset.subset_seed=-1 must be >= 0"),
    (["train.augment.translate=32"], "train.augment.translate=32 must be < 32"),
])
def test_a_bad_value_for_a_sweep_is_one_line_and_creates_no_study(tmp_path, monkeypatch, capsys, args, wanted):
    from cnnexp import sweep

    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, mlflow_store=False)
    main_error(sweep.main, ["--sweep", str(path), *args], capsys, wanted)
    assert files_under(tmp_path) == {path.name}


@pytest.mark.parametrize(("text", "wanted"), [
    ("sweep: 5\nparams: {kernel: choice(3,5)}\n", "sweep=5 must be a mapping"),
    ("answers: 5\nparams: {kernel: choice(3,5)}\n", "answers=5 must be a mapping"),
    ("design: [1, 2]\n", "design=[1, 2] must be a mapping"),
    ("params: [kernel]\n", "params=['kernel'] must be a mapping"),
    ("overrides: 5\nparams: {kernel: choice(3,5)}\n", "overrides=5 must be a list of overrides"),
    ("overrides: train.epochs=1\nparams: {kernel: choice(3,5)}\n", "overrides='train.epochs=1' must be a list"),
    ("overrides: [{a: 1}]\nparams: {kernel: choice(3,5)}\n", "overrides.0={'a': 1} must be a string"),
    ("description: [1]\nparams: {kernel: choice(3,5)}\n", "description=[1] must be a string"),
    ("sweep: {sampler: 5}\nparams: {kernel: choice(3,5)}\n", "sweep.sampler=5 must be a mapping"),
    ("sweep: {pruner: null}\nparams: {kernel: choice(3,5)}\n", "sweep.pruner=None must be a mapping"),
    ("sweep: {constraints: 5}\nparams: {kernel: choice(3,5)}\n", "sweep.constraints=5 must be a list"),
    ("design: {seeds: 2, baseline: {kernel: 3}, vary: 5}\n", "design.vary=5 must be a mapping"),
    ("design: {seeds: 2, baseline: {kernel: 3}, vary: {kernel: [3, 5]}, arms: {x: 5}}\n",
     "design.arms.x=5 must be a list of overrides"),
    ("swep: {n_trials: 2}\nparams: {kernel: choice(3,5)}\n", "unknown section 'swep'"),
    ("[1, 2]\n", "is not a sweep file (it holds a list)"),
    ("5\n", "is not a sweep file"),
    ("sweep: [1,\n", "is not a sweep file (while parsing"),
    ("sweep: !!python/object/apply:os.system ['touch RAN']\n",
     "is not a sweep file (could not determine a constructor"),
])
def test_every_section_of_a_sweep_file_has_its_type_checked_in_one_line(tmp_path, monkeypatch, capsys, text, wanted):
    from cnnexp import sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    main_error(sweep.main, ["--sweep", "bad.yaml"], capsys, "bad.yaml", wanted)
    assert files_under(tmp_path) == {"bad.yaml"}


def _npz(path: Path, x_train_header: dict) -> Path:
    """An mnist.npz whose x_train.npy member has this header (and 1 KB of data); the other members are real."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, x_train_header)
    members = {"y_train": np.zeros(10, np.uint8), "x_test": np.zeros((10, 28, 28), np.uint8),
               "y_test": np.zeros(10, np.uint8)}
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x_train.npy", header.getvalue() + bytes(1024))
        for name, array in members.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{name}.npy", buffer.getvalue())
    return path


@pytest.mark.parametrize(("header", "wanted"), [
    ({"descr": "|u1", "fortran_order": False, "shape": (1_000_000_000, 28, 28)},  # 730 GiB declared
     "x_train declares 1000000000x28x28 uint8 = 784,000,000,000 bytes, more than an array here may hold"),
    ({"descr": "|O", "fortran_order": False, "shape": (10, 28, 28)}, "x_train holds object values"),
])
def test_an_npz_member_is_checked_from_its_header_before_any_data_is_read(tmp_path, monkeypatch, capsys, header,
                                                                          wanted):
    from cnnexp import run

    monkeypatch.chdir(tmp_path)
    npz = _npz(tmp_path / "mnist.npz", header)
    main_error(run.main, ["dataset=mnist", f"dataset.path={npz}", "model=mnist_cnn", "tracking=off"], capsys,
               f"{npz}:", wanted)
    assert files_under(tmp_path) == {"mnist.npz"}


def test_a_test_fraction_that_leaves_no_test_image_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from cnnexp import run

    tree = _tree(tmp_path / "pets")  # 8 images: 1% of them rounds to none
    monkeypatch.chdir(tmp_path)
    main_error(run.main, ["dataset=folder", f"dataset.path={tree}", "dataset.input_shape=[8,8,3]",
                          "dataset.test_fraction=0.01", "tracking=off"], capsys,
               "dataset.test_fraction=0.01 of the 8 images in", "leaves no test image")
    assert not (tmp_path / "outputs").exists()


def _documented_overrides(readme: str) -> tuple[list[list[str]], set[str], set[str]]:
    """(the `python -m cnnexp.run` command lines, key=value overrides, keys written with a placeholder value).

    From README.md's code spans and blocks; the security table's values are refused on purpose, so only
    its keys count there.
    """
    import re

    security = readme.index("## Security and failure modes")
    end = readme.index("\n## ", security + 5)
    commands, overrides, keys = [], set(), set()
    for part, values_too in ((readme[:security] + readme[end:], True), (readme[security:end], False)):
        spans = re.findall(r"```[a-z]*\n(.*?)```", part, flags=re.S)
        spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", part, flags=re.S))
        for line in (line for span in spans for line in span.splitlines()):
            command = re.search(r"python -m cnnexp\.run((?: +[^ #;)…]+)+)", line) or re.search(
                r"make run ARGS='([^']*)'", line)
            if command and values_too:
                commands.append(command.group(1).split())
            for key, value in re.findall(r"(?<![\w.+-])(\+?(?:dataset|model|train|tracking|sweep|answers)"
                                         r"(?:\.[A-Za-z_0-9]+)+)=([^\s`'\",\]}]+)", line):
                placeholder = not values_too or value in ("N", "K", "...", "…") or "<" in value
                (keys if placeholder else overrides).add(key if placeholder else f"{key}={value}")
    return commands, overrides, keys


def test_every_key_the_readme_tells_users_to_type_is_accepted():
    from cnnexp import PROJECT_ROOT
    from cnnexp.config import known_keys
    from cnnexp.study.settings import DEFAULTS

    commands, overrides, keys = _documented_overrides((PROJECT_ROOT / "README.md").read_text())
    assert len(commands) >= 10 and len(overrides) >= 10, (commands, overrides)  # the extraction still finds them
    for command in commands:
        compose_config(command)  # a ConfigError names the key
    settings = {f"{section}.{key}" for section in ("sweep", "answers") for key in DEFAULTS[section]}
    for text in sorted(overrides):
        key = text.partition("=")[0]
        if key.startswith(("sweep.", "answers.")):
            # A sampler's and a pruner's own options are checked against their classes (sweep.sampler.seed=...).
            assert key in settings or key.startswith(("sweep.sampler.", "sweep.pruner.")), \
                f"README.md tells users to type {text}, which no sweep setting is"
        else:
            compose_config([text])
    known = known_keys()
    for key in sorted(keys):
        section, _, rest = key.lstrip("+").partition(".")
        swept = f"{section}.{rest}" in settings or key.startswith(("sweep.sampler.", "sweep.pruner."))
        assert (swept if section in ("sweep", "answers") else rest in known[section]), key
    assert compose_config(["tracking.timeout=5"]).tracking.timeout == 5  # what store.configure waits for


# --- 7. nothing outside the configured folders: HOME keeps only the configured cache ---------------------------------

def _home_env(home: Path) -> dict:
    """The user's environment with HOME elsewhere and nothing that would hide a write to it (the project's and
    MLflow's own settings unset; no CI or pytest markers, by which MLflow would turn its telemetry off itself)."""
    ci = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "DO_NOT_TRACK",
          "MPLCONFIGDIR", "PYTEST_XDIST_WORKER"}
    env = {k: v for k, v in os.environ.items()
           if k not in ci and not k.startswith(("MLFLOW_", "CNNEXP_", "KERAS_", "XDG_"))}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1"}


@needs_mnist
def test_run_sweep_report_and_ui_leave_home_untouched_but_the_configured_cache(tmp_path):
    import sys

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = _home_env(home)
    doc = {"overrides": [*TINY_MNIST, *tracking_overrides(work)], "params": {"kernel": "choice(3)"},
           "sweep": {"n_trials": 1, "sampler": {"name": "grid"}, "storage": f"sqlite:///{work / 'studies.db'}",
                     "output_dir": str(work / "out"), "estimate": False, "system_metrics": False}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(doc))
    commands = [["cnnexp.run", *TINY_MNIST, *tracking_overrides(work)], ["cnnexp.sweep", "--sweep", "tiny.yaml"],
                ["cnnexp.report", "tiny", "--storage", f"sqlite:///{work / 'studies.db'}", "--out", str(work / "out")],
                ["cnnexp.ui", "mlflow-url", "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--study", "tiny"]]
    for command in commands:
        proc = subprocess.run([sys.executable, "-m", *command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    written = files_under(home)
    # The decode cache and matplotlib's font cache under ~/.cache/cnnexp; Keras' own config in ~/.keras, the
    # documented Keras folder ($KERAS_HOME), which Keras writes when it is imported. Nothing else: no
    # ~/.config/mlflow/telemetry.json, no ~/.cache/matplotlib or ~/.config/matplotlib.
    outside_cnnexp = {p for p in written if not p.startswith(".cache/cnnexp")}
    assert outside_cnnexp <= {".cache", ".keras", ".keras/keras.json"}, written
    assert any(p.startswith(".cache/cnnexp/matplotlib/fontlist") for p in written), written  # the report drew plots


def test_mlflow_telemetry_is_off_unless_tracking_telemetry_turns_it_on(tmp_path, monkeypatch):
    from cnnexp import runtime
    from cnnexp.tracking import store

    for key in ("MLFLOW_DISABLE_TELEMETRY", runtime.TELEMETRY_MARKER):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")  # restored after: MLflow sets it when pointed
    runtime.setup_environment()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # set before any entry point imports mlflow
    assert compose_config().tracking.telemetry is False
    store.configure(compose_config([*tracking_overrides(tmp_path), "tracking.telemetry=true"]).tracking)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"  # on, for this process and the workers it starts
    runtime.mlflow_telemetry(False)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.delenv(runtime.TELEMETRY_MARKER)  # the user's own MLFLOW_DISABLE_TELEMETRY=true wins
    runtime.setup_environment()
    runtime.mlflow_telemetry(True)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


# --- 8. the UI: names, YAML, unreachable stores, ports in use, another tool's file ------------------------------------

@pytest.mark.parametrize(("args", "wanted"), [
    (["mlflow-url", "--study", "tiny'x"], """--study="tiny'x" may hold only letters, digits"""),
    (["dashboard", "--study", "a b"], "--study='a b' may hold only letters, digits"),
    (["mlflow-url", "--sweep", "list.yaml"], "list.yaml=[1, 2] must be a mapping of sections"),
    (["mlflow-url", "--sweep", "scalar.yaml"], "scalar.yaml=5 must be a mapping of sections"),
    (["mlflow-url", "--sweep", "bad.yaml"], "bad.yaml is not a readable sweep file (while parsing"),
    (["mlflow-url", "--sweep", "code.yaml"],
     "code.yaml is not a readable sweep file (could not determine a constructor"),
    (["mlflow-url", "--sweep", "sweep5.yaml"], "sweep5.yaml: sweep=5 must be a mapping of settings"),
    (["mlflow", "--sweep", "name.yaml"], "sweep.study_name=\"x'\" may hold only letters"),
    (["mlflow", "--port", "0"], "--port 0 must be in 1..65535"),
    (["dashboard", "--port", "70000"], "--port 70000 must be in 1..65535"),
])
def test_ui_arguments_are_one_line_and_run_no_code(tmp_path, monkeypatch, capsys, args, wanted):
    from cnnexp import ui

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: ./mlflow.db, not there
    files = {"list.yaml": "[1, 2]\n", "scalar.yaml": "5\n", "bad.yaml": "sweep: [1,\n", "sweep5.yaml": "sweep: 5\n",
             "code.yaml": "sweep: !!python/object/apply:os.system ['touch RAN']\n",
             "name.yaml": "sweep: {study_name: \"x'\"}\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if args[0] == "dashboard":
        optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'studies.db'}")
        files["studies.db"] = ""
    main_error(ui.main, args, capsys, wanted)
    assert files_under(tmp_path) == set(files)  # no RAN, no mlflow.db


def test_mlflow_url_on_a_server_that_does_not_answer_says_so_within_seconds(tmp_path, monkeypatch, capsys):
    import time

    from cnnexp import ui

    monkeypatch.chdir(tmp_path)
    began = time.monotonic()
    main_error(ui.main, ["mlflow-url", "--tracking-uri", "http://127.0.0.1:1"], capsys,
               "the MLflow server http://127.0.0.1:1 does not answer (Connection refused")
    assert time.monotonic() - began < 10  # MLflow's own retries took over a minute
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("command", ["mlflow", "dashboard"])
def test_a_port_in_use_is_one_line_and_no_server_starts(tmp_path, monkeypatch, capsys, command):
    import socket

    from cnnexp import ui

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'studies.db'}")

    def no_server(*args, **kwargs):
        raise AssertionError(f"a server was started: {args}")

    monkeypatch.setattr(ui.subprocess, "Popen", no_server)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        main_error(ui.main, [command, "--port", str(port)], capsys, f"--port {port}: 127.0.0.1:{port} is in use")
    assert files_under(tmp_path) == {"studies.db"}


def test_a_server_that_exits_on_its_own_is_one_error_line(capsys):
    import sys

    from cnnexp import ui

    assert ui.serve([sys.executable, "-c", "raise SystemExit(0)"], 5999) == 2  # mlflow ui exits 0 on a port in use
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "exited on its own (exit code 0) instead of serving" in err, err


def _study_parent(uri: str, name: str) -> None:
    """An MLflow store holding one study's parent run, as a sweep leaves it."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("cnnexp")
    client.create_run(experiment, run_name=f"study {name}", tags={"cnnexp.role": "study", "cnnexp.study": name})


def test_a_study_name_is_never_pasted_into_an_mlflow_filter(tmp_path):
    from cnnexp.errors import StorageError
    from cnnexp.tracking import views

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _study_parent(uri, "tiny")
    assert views.study_runs_url(uri, "http://ui", "tiny")[0] == "tiny"
    with pytest.raises(StorageError, match="no study .* in the MLflow store"):
        views.study_runs_url(uri, "http://ui", "x' OR tags.`cnnexp.study` != '")


def test_an_optuna_storage_named_as_the_mlflow_store_is_never_written_to(tmp_path, monkeypatch, capsys):
    from cnnexp import ui

    monkeypatch.chdir(tmp_path)
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    before = hashlib.sha256((tmp_path / "studies.db").read_bytes()).hexdigest()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///studies.db")
    for command in ("mlflow-url", "mlflow"):
        main_error(ui.main, [command], capsys, "studies.db is an Optuna study storage, not an MLflow store")
    assert hashlib.sha256((tmp_path / "studies.db").read_bytes()).hexdigest() == before
    assert files_under(tmp_path) == {"studies.db"}


@needs_mnist
def test_a_run_whose_mlflow_store_is_an_optuna_storage_trains_with_one_warning(tmp_path, monkeypatch, capsys):
    from cnnexp import run

    monkeypatch.chdir(tmp_path)
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    before = hashlib.sha256((tmp_path / "studies.db").read_bytes()).hexdigest()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///studies.db")
    assert run.main(TINY_MNIST) == 0  # tracking never decides whether training happens
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if "MLflow" in line]
    assert len(said) == 1 and "is an Optuna study storage, not an MLflow store" in said[0], err[-3000:]
    assert "test accuracy:" in out and "Traceback" not in err
    assert hashlib.sha256((tmp_path / "studies.db").read_bytes()).hexdigest() == before

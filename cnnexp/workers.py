"""Many workers on one study: local worker processes, a lock around "count, then ask", GPU pinning.

`sweep.workers=N` starts N worker processes on this machine; invocations on other machines
(Slurm array tasks, Kubernetes pods) join the same study through `sweep.storage`. The total
trial count holds across all of them because a worker only asks for a trial while holding
a study-wide lock, after counting the trials already there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path


@contextlib.contextmanager
def trial_slot_lock(storage_url: str):
    """Hold a lock shared by every worker of the study's storage.

    SQLite and journal files: an flock on a file beside them (one machine, or a file system
    with working locks). PostgreSQL/MySQL: an advisory lock in the database itself.
    """
    if storage_url.startswith(("sqlite:///", "journal:")):
        path = storage_url.removeprefix("sqlite:///").removeprefix("journal:").removeprefix("//")
        # Not "<file>.lock": Optuna's journal backend keeps its own lock under that name.
        lock_path = Path(path).with_name(Path(path).name + ".cnnexp-lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif storage_url.startswith("postgresql"):
        with _postgres_advisory_lock(storage_url):
            yield
    else:
        yield  # in-memory or unknown storage: a single process


_ENGINES: dict[str, object] = {}


@contextlib.contextmanager
def _postgres_advisory_lock(url: str):
    import sqlalchemy

    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=1)
    key = int(hashlib.sha256(b"cnnexp-trial-slot").hexdigest()[:15], 16)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()


def visible_gpus() -> list[str]:
    """GPU ids this machine offers (CUDA_VISIBLE_DEVICES, else nvidia-smi), without importing TF."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def worker_env(index: int, gpus: list[str]) -> dict[str, str]:
    """One trial per GPU: worker i sees only GPU i (round robin when there are more workers)."""
    env = {**os.environ, "CNNEXP_WORKER": str(index), "PYTHONUNBUFFERED": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return env


def run_workers(sweep, args) -> int:
    """Start `sweep.workers` worker processes on the study, wait for them, then report."""
    from cnnexp.sweep import finish, open_study

    settings = sweep.settings
    count = int(settings.workers)
    # The workers create (or find) the study and its MLflow parent run under the trial-slot lock.
    gpus = visible_gpus()
    print(f"Starting {count} workers on study {settings.study_name!r} ({settings.storage})"
          + (f", GPUs {gpus}" if gpus else ", no GPU") + ".", flush=True)
    command = [sys.executable, "-m", "cnnexp.sweep", "--sweep", args.sweep, "--no-report",
               *args.overrides, "sweep.workers=1", "sweep.estimate=false"]
    procs = [subprocess.Popen(command, env=worker_env(i, gpus)) for i in range(count)]

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if any(code in (130, -signal.SIGTERM) for code in codes):
        print("Workers were interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    return finish(sweep, open_study(sweep), report=not args.no_report)

"""What the user opens: a study's page in the MLflow UI or optuna-dashboard, printed first, then served.

    python -m cnnexp.ui mlflow [--study NAME | --sweep NAME] [--port 5000]      # make ui
    python -m cnnexp.ui mlflow-url [--study NAME | --sweep NAME] [--port 5000]  # the URL only
    python -m cnnexp.ui dashboard [--study NAME | --sweep NAME] [--port 8080]   # make dashboard

The servers run in a process group of their own, and stopping this command (Ctrl-C, SIGTERM,
SIGHUP: `make` forwards them) stops the whole group: `mlflow ui` starts job consumers of its own
that would otherwise outlive it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from cnnexp.errors import CnnexpError, StorageError
from cnnexp.study.space import sweep_path
from cnnexp.tracking.views import dashboard_target, dashboard_url, study_runs_url

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def study_name_of(sweep: str) -> str:
    """A sweep's study name (its `sweep.study_name`, by default the file's name), without composing its config."""
    import yaml

    path = sweep_path(sweep)
    settings = (yaml.safe_load(path.read_text()) or {}).get("sweep") or {}
    return str(settings.get("study_name") or path.stem)


def serve(command: list[str]) -> int:
    """Run a server until it exits or this process is told to stop; then stop its whole process group."""
    server = subprocess.Popen(command, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_group(server)


def _stop_group(server: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)  # the server and everything it started
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children may linger a moment
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return


def program(name: str) -> str:
    """A console script of this environment (mlflow, optuna-dashboard), else the one on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def _mlflow(args, study: str | None, serve_it: bool) -> int:
    base = (os.environ.get("MLFLOW_UI_BASE") or f"http://127.0.0.1:{args.port}").rstrip("/")
    try:
        name, url = study_runs_url(args.tracking_uri, base, study)
        print(f"Runs of study {name!r}, best first: {url}", flush=True)
    except StorageError as err:  # the UI still starts: say where it is
        print(f"{err} The MLflow UI: {base}", flush=True)
    if not serve_it:
        return 0
    return serve([program("mlflow"), "ui", "--backend-store-uri", args.tracking_uri, "--host", "127.0.0.1",
                  "--port", str(args.port)])


def _dashboard(args, study: str | None) -> int:
    try:
        name, study_id, argument = dashboard_target(args.storage, study)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Study {name!r} in optuna-dashboard: {dashboard_url(f'http://127.0.0.1:{args.port}', study_id)}",
          flush=True)
    return serve([program("optuna-dashboard"), argument, "--host", "127.0.0.1", "--port", str(args.port)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnexp.ui",
                                     description="Print, then serve, a study's page in the MLflow UI or optuna-dashboard.")
    commands = parser.add_subparsers(dest="command", required=True)
    mlflow_cmds = [commands.add_parser("mlflow", help="print the URL of a study's runs, then serve the MLflow UI"),
                   commands.add_parser("mlflow-url", help="print the URL of a study's runs in the MLflow UI")]
    for command in mlflow_cmds:
        command.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
        command.add_argument("--port", type=int, default=5000, help="the port `mlflow ui` listens on")
    dashboard_cmd = commands.add_parser("dashboard", help="print the study's page, then serve optuna-dashboard")
    dashboard_cmd.add_argument("--storage", default="sqlite:///studies.db")
    dashboard_cmd.add_argument("--port", type=int, default=8080)
    for command in (*mlflow_cmds, dashboard_cmd):
        which = command.add_mutually_exclusive_group()
        which.add_argument("--study", help="a study name (default: the most recent study)")
        which.add_argument("--sweep", help="a sweep in sweeps/ (or a YAML path): its study")
    args = parser.parse_args(argv)
    try:
        study = study_name_of(args.sweep) if args.sweep else args.study
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "dashboard":
        return _dashboard(args, study)
    return _mlflow(args, study, serve_it=args.command == "mlflow")


if __name__ == "__main__":
    sys.exit(main())

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
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from cnnexp import checks, runtime
from cnnexp.errors import CnnexpError, ConfigError, StorageError
from cnnexp.study.settings import DEFAULTS, study_name
from cnnexp.study.space import sweep_path
from cnnexp.tracking.views import check_store, dashboard_target, dashboard_url, study_runs_url

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def study_name_of(sweep: str) -> str:
    """A sweep's study name (its `sweep.study_name`, by default the file's name), without composing its config.

    The file is read as plain YAML (no tags, so no code); a file that is not a mapping, or whose `sweep:`
    section is not one, is one ConfigError line.
    """
    path = sweep_path(sweep)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} is not a readable sweep file ({' '.join(str(err).split())[:300]}).") from None
    checks.mapping(doc if doc is not None else {}, str(path), "a mapping of sections (sweep:, params:, ...)")
    settings = (doc or {}).get("sweep") or {}
    checks.mapping(settings, f"{path}: sweep", "a mapping of settings")
    return study_name(settings.get("study_name") or path.stem, f"{path}: sweep.study_name")


def serve(command: list[str], port: int) -> int:
    """Run a server on `port` until it exits or this process is told to stop; then stop its whole process group.

    A server that exits on its own, at once or later, is one error line and exit 2: servers only stop when told
    to (and `mlflow ui` exits 0 when it can't bind its port: callers check the port first, `check_port`).
    """
    server = subprocess.Popen(command, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        code = server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_group(server)
    print(f"error: {Path(command[0]).name} exited on its own (exit code {code}) instead of serving "
          f"http://127.0.0.1:{port}; its own lines above say why.", file=sys.stderr)
    return 2


def check_port(port: int) -> None:
    """Port `port` on 127.0.0.1 is free for a server, else one ConfigError line (checked as a server binds it)."""
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} must be in 1..65535.")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed port in TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            busy = err.errno == errno.EADDRINUSE
            raise ConfigError(f"--port {port}: 127.0.0.1:{port} " + ("is in use (another server runs there?); stop "
                              "it or give another --port." if busy else f"can't be used ({err.strerror or err}); "
                              "give another --port.")) from None


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
    if serve_it:  # never start a server on another tool's file, an unreachable store or a port in use
        check_store(args.tracking_uri)
        check_port(args.port)
    try:
        name, url = study_runs_url(args.tracking_uri, base, study)
        print(f"Runs of study {name!r}, best first: {url}", flush=True)
    except StorageError as err:
        if not serve_it:  # the URL is all this command gives
            raise
        print(f"{err} The MLflow UI: {base}", flush=True)  # no study yet: the UI still starts
    if not serve_it:
        return 0
    return serve([program("mlflow"), "ui", "--backend-store-uri", args.tracking_uri, "--host", "127.0.0.1",
                  "--port", str(args.port)], args.port)


def _dashboard(args, study: str | None) -> int:
    name, study_id, argument = dashboard_target(args.storage, study)
    check_port(args.port)
    print(f"Study {name!r} in optuna-dashboard: {dashboard_url(f'http://127.0.0.1:{args.port}', study_id)}",
          flush=True)
    return serve([program("optuna-dashboard"), argument, "--host", "127.0.0.1", "--port", str(args.port)], args.port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnexp.ui",
                                     description="Print, then serve, a study's page in the MLflow UI or "
                                                 "optuna-dashboard.")
    commands = parser.add_subparsers(dest="command", required=True)
    mlflow_cmds = [commands.add_parser("mlflow", help="print the URL of a study's runs, then serve the MLflow UI"),
                   commands.add_parser("mlflow-url", help="print the URL of a study's runs in the MLflow UI")]
    for command in mlflow_cmds:
        command.add_argument("--tracking-uri", default=None,
                             help="the runs' store (default: the tracking config's: MLFLOW_TRACKING_URI or mlflow.db)")
        command.add_argument("--port", type=int, default=5000, help="the port `mlflow ui` listens on")
    dashboard_cmd = commands.add_parser("dashboard", help="print the study's page, then serve optuna-dashboard")
    dashboard_cmd.add_argument("--storage", default=DEFAULTS["sweep"]["storage"])
    dashboard_cmd.add_argument("--port", type=int, default=8080)
    for command in (*mlflow_cmds, dashboard_cmd):
        which = command.add_mutually_exclusive_group()
        which.add_argument("--study", help="a study name (default: the most recent study)")
        which.add_argument("--sweep", help="a sweep in sweeps/ (or a YAML path): its study")
    args = parser.parse_args(argv)
    runtime.setup_environment()  # before MLflow is imported: its telemetry off, its retries short
    if getattr(args, "tracking_uri", "") is None:  # one home for the default: the tracking config
        from cnnexp.config import compose_config

        args.tracking_uri = str(compose_config().tracking.uri)
    try:
        study = study_name_of(args.sweep) if args.sweep else args.study
        if study is not None:
            study_name(study, "--study")  # letters, digits, '.', '_', '-': as every study is named
        if args.command == "dashboard":
            return _dashboard(args, study)
        return _mlflow(args, study, serve_it=args.command == "mlflow")
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What the user opens: `python -m cnnexp.ui mlflow-url | dashboard [--study NAME | --sweep NAME]`.

    python -m cnnexp.ui mlflow-url [--study NAME | --sweep NAME] [--port 5000]
    python -m cnnexp.ui dashboard [--study NAME | --sweep NAME] [--port 8080]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from cnnexp.errors import CnnexpError, StorageError
from cnnexp.tracking.views import dashboard_target, dashboard_url, study_runs_url


def study_name_of(sweep: str) -> str:
    """A sweep's study name (its `sweep.study_name`, by default the file's name), without composing its config."""
    import yaml

    from cnnexp.sweep.space import sweep_path

    path = sweep_path(sweep)
    settings = (yaml.safe_load(path.read_text()) or {}).get("sweep") or {}
    return str(settings.get("study_name") or path.stem)



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnexp.ui", description="Print (and serve) a study's page in the MLflow UI or optuna-dashboard.")
    commands = parser.add_subparsers(dest="command", required=True)
    mlflow_cmd = commands.add_parser("mlflow-url", help="print the URL of a study's runs in the MLflow UI")
    mlflow_cmd.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    mlflow_cmd.add_argument("--port", type=int, default=5000, help="the port `mlflow ui` listens on")
    dashboard_cmd = commands.add_parser("dashboard", help="print the study's page, then start optuna-dashboard")
    dashboard_cmd.add_argument("--storage", default="sqlite:///studies.db")
    dashboard_cmd.add_argument("--port", type=int, default=8080)
    for command in (mlflow_cmd, dashboard_cmd):
        which = command.add_mutually_exclusive_group()
        which.add_argument("--study", help="a study name (default: the most recent study)")
        which.add_argument("--sweep", help="a sweep in sweeps/ (or a YAML path): its study")
    args = parser.parse_args(argv)
    try:
        study = study_name_of(args.sweep) if args.sweep else args.study
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "mlflow-url":
        base = (os.environ.get("MLFLOW_UI_BASE") or f"http://127.0.0.1:{args.port}").rstrip("/")
        try:
            name, url = study_runs_url(args.tracking_uri, base, study)
        except StorageError as err:  # the UI still starts: say where it is
            print(f"{err} The MLflow UI: {base}", flush=True)
            return 0
        print(f"Runs of study {name!r}, best first: {url}", flush=True)
        return 0
    try:
        name, study_id, argument = dashboard_target(args.storage, study)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Study {name!r} in optuna-dashboard: {dashboard_url(f'http://127.0.0.1:{args.port}', study_id)}",
          flush=True)
    program = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or "optuna-dashboard"
    os.execvp(program, [program, argument, "--host", "127.0.0.1", "--port", str(args.port)])


if __name__ == "__main__":
    sys.exit(main())

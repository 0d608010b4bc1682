"""The report CLI: `python -m cnnexp.report <study> [--storage URL] [--out FOLDER]`."""

from __future__ import annotations

import argparse
import sys

from cnnexp.console import setup_logging
from cnnexp.errors import CnnexpError
from cnnexp.report.write import write_report
from cnnexp.sweep.space import DEFAULTS
from cnnexp.sweep.study import load_study
from cnnexp.tracking import runs


def main(argv=None) -> int:
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(prog="python -m cnnexp.report", description="Report on an Optuna study.")
    parser.add_argument("study", help="the study name (a sweep's study_name, by default the sweep file's name)")
    parser.add_argument("--storage", default=DEFAULTS["sweep"]["storage"])
    parser.add_argument("--out", default=DEFAULTS["sweep"]["output_dir"])
    args = parser.parse_args(argv)
    setup_logging()
    try:
        study = load_study(args.study, args.storage)
        settings = OmegaConf.create({**DEFAULTS["sweep"], "study_name": args.study, "storage": args.storage,
                                     "output_dir": args.out, "direction": study.direction.name.lower(),
                                     "n_trials": len(study.trials),
                                     "metric": study.user_attrs.get("metric", DEFAULTS["sweep"]["metric"])})
        if study.user_attrs.get("mlflow_tracking_uri"):
            import mlflow

            mlflow.set_tracking_uri(study.user_attrs["mlflow_tracking_uri"])
        print(write_report(study, settings, parent=runs.Run(study.user_attrs.get("mlflow_parent_run_id"))))
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

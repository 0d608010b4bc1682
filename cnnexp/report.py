"""The report CLI: `python -m cnnexp.report <study> [--storage URL] [--out FOLDER]`, for a study run earlier."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from cnnexp import record, runtime, stop, stores
from cnnexp.console import setup_logging
from cnnexp.errors import CnnexpError
from cnnexp.reporting.analysis import analyse
from cnnexp.reporting.write import write_report
from cnnexp.study.optuna_study import load_study
from cnnexp.study.settings import DEFAULTS, answers_settings, study_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnexp.report", description="Write the report of an Optuna study.")
    parser.add_argument("study", help="the study name (a sweep's study_name, by default the sweep file's name)")
    parser.add_argument("--storage", default=DEFAULTS["sweep"]["storage"])
    parser.add_argument("--out", default=DEFAULTS["sweep"]["output_dir"])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="attach the report to the study's run in this MLflow store (default: MLFLOW_TRACKING_URI; "
                             "none: the report stays local). Never the store a studies file names.")
    parser.add_argument("--compare", help="another study (same storage): say per question whether its verdict holds "
                                          "in both regimes, e.g. seed_questions_fast against seed_questions")
    args = parser.parse_args(argv)
    runtime.setup_environment()
    setup_logging()
    try:
        with stop.on_signals():
            return _main(args)
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"error: stopped ({err or 'SIGINT'}); the previous report (if any) is left whole.", file=sys.stderr)
        return 130


def _main(args) -> int:
    study = load_study(study_name(args.study, "study"), args.storage)  # read-only: a missing one creates nothing
    stores.check_writable(Path(args.out), "--out")  # a file, a read-only folder: one line, before the report is made
    facts = record.read_study(study)
    settings = OmegaConf.create({"study_name": args.study, "storage": args.storage, "output_dir": args.out})
    compare = None
    if args.compare:
        other = load_study(study_name(args.compare, "--compare"), args.storage)
        other_facts = record.read_study(other)
        compare = (args.compare, analyse(other, record.read_trials(other), other_facts,
                                         answers_settings(other_facts.answers)))
    print(write_report(study, settings, answers_settings(facts.answers), compare, tracking_uri=args.tracking_uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())

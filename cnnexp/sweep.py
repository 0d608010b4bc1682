"""The sweep CLI: `python -m cnnexp.sweep --sweep <name> [overrides]`, then the report.

    python -m cnnexp.sweep --sweep kernel_size
    python -m cnnexp.sweep --sweep quick 'kernel=choice(2,3,4,5,6,7)' sweep.n_trials=6 train.epochs=1

This is where the study (`cnnexp.study`) and the report (`cnnexp.reporting`) join. Exit codes: 0
done, 1 no trial completed, 2 bad input (one line, `error: ...`), 130 stopped (SIGTERM, SIGHUP,
Ctrl-C, in any phase: the plan, the trials, the champion, the report; the running trial is
queued again, the study and its MLflow runs are saved and ended, never left RUNNING).
"""

from __future__ import annotations

import argparse
import os
import sys

from cnnexp import runtime, stop
from cnnexp.console import say, setup_logging
from cnnexp.errors import CnnexpError
from cnnexp.reporting.write import write_report
from cnnexp.study import budget, parent
from cnnexp.study.engine import RecycleProcess, finished, optimize, preflight
from cnnexp.study.optuna_study import open_study
from cnnexp.study.space import Sweep, load_sweep
from cnnexp.study.workers import run_workers


def report(sweep: Sweep, study) -> int:
    """Write the report and end the parent run; the report is complete or says how to write it again."""
    settings = sweep.settings
    again = (f"python -m cnnexp.report {settings.study_name} --storage {settings.storage} "
             f"--out {settings.output_dir}")
    status = None
    try:
        say(write_report(study, settings, sweep.answers, tracking_uri=parent.tracking_uri(sweep)))
        code = 0
    except KeyboardInterrupt:
        print(f"error: interrupted while writing the report; the study is saved, write it with: {again}",
              file=sys.stderr)
        status, code = "KILLED", 130
    except Exception as err:  # noqa: BLE001 - the study is saved; the report can be rerun on its own
        print(f"error: the report could not be written ({type(err).__name__}: {str(err).splitlines()[0]}); the study "
              f"is saved, write it with: {again}", file=sys.stderr)
        code = 2
    finally:
        with stop.ignoring_signals():  # never left RUNNING, whatever the report did, nor cut by a second signal
            complete = parent.end(study, parent.tracking_uri(sweep), status)
    if not complete:
        print(f"error: no trial of study {settings.study_name!r} completed; see the trials' errors in {again}.",
              file=sys.stderr)
        return 1
    return code


def _run(args) -> int:
    sweep = load_sweep(args.sweep, args.overrides)
    if int(sweep.settings.workers) > 1:
        preflight(sweep)
        code = run_workers(args.sweep, args.overrides, int(sweep.settings.workers), verbose=args.verbose)
        if code:
            return code
        study = open_study(sweep.settings, sweep.space)
    else:
        if sweep.settings.estimate and not sweep.settings.get("budget") and os.environ.get("CNNEXP_WORKER") is None \
                and not runtime.has_gpu():
            images = sweep.data_key("dataset.train_limit") or budget.full_train(sweep)
            say(budget.estimate(sweep.overrides, int(sweep.settings.n_trials), int(sweep.base.train.epochs),
                                int(images)))
        study = optimize(sweep, recycle_after=int(sweep.settings.recycle_after))
    try:
        if sweep.settings.get("objectives"):
            parent.register_champion(sweep, study)
    except KeyboardInterrupt:
        with stop.ignoring_signals():
            parent.end(study, parent.tracking_uri(sweep), "KILLED")
        raise
    if args.no_report:
        if finished(study, sweep):  # the last worker ends the parent; a late one finds it ended and leaves it so
            parent.end(study, parent.tracking_uri(sweep))
        return 0
    return report(sweep, study)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnnexp.sweep", description="Run an Optuna study from a sweep file, then its report.",
        epilog="Overrides: sweep.<setting>=..., answers.<setting>=..., a search space such as "
               "'kernel=choice(2,3,4)', or any cnnexp.run override (train.epochs=1).")
    parser.add_argument("--sweep", default="seed_questions", help="a name in sweeps/ or a YAML path")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end (a worker)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own logging and warnings")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    runtime.setup_environment()
    setup_logging(args.verbose)
    try:
        with stop.on_signals():  # every phase: the plan's timing, the trials, the champion, the report
            return _run(args)
    except RecycleProcess:
        # Same command, same process id (Slurm, Kubernetes and sweep.workers keep tracking it).
        say("Restarting this worker to give TensorFlow's memory back (sweep.recycle_after).")
        os.environ.setdefault("CNNEXP_WORKER", "0")  # the restarted process skips the estimate
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "cnnexp.sweep", *sys.argv[1:]])
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"error: stopped ({err or 'SIGINT'}); the study is saved and its runs ended: rerun the same command to "
              "resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The sweep CLI: `python -m cnnexp.sweep --sweep <name> [overrides]`.

    python -m cnnexp.sweep --sweep kernel_size
    python -m cnnexp.sweep --sweep quick 'kernel=choice(2,3,4,5,6,7)' sweep.n_trials=6 train.epochs=1
"""

from __future__ import annotations

import argparse
import os
import sys

from cnnexp.console import say, setup_logging
from cnnexp.errors import CnnexpError
from cnnexp.sweep.engine import RecycleProcess, finish, optimize, preflight
from cnnexp.sweep.space import load_sweep
from cnnexp.sweep.study import open_study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnnexp.sweep", description="Run an Optuna study from a sweep file.",
        epilog="Overrides: sweep.<setting>=..., a search space such as 'kernel=choice(2,3,4)', "
               "or any cnnexp.run override (train.epochs=1).",
    )
    parser.add_argument("--sweep", default="seed_questions", help="a name in sweeps/ or a YAML path")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own logging and warnings")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        sweep = load_sweep(args.sweep, args.overrides)
        if int(sweep.settings.workers) > 1:
            from cnnexp.sweep.workers import run_workers

            preflight(sweep)
            code = run_workers(args.sweep, args.overrides, int(sweep.settings.workers), verbose=args.verbose)
            if code:
                return code
            study = open_study(sweep.settings, sweep.space)
            return finish(sweep, study, report=not args.no_report)
        # With a budget the plan says what it will cost; the estimate is for studies without one.
        if sweep.settings.estimate and not sweep.settings.get("budget") and os.environ.get("CNNEXP_WORKER") is None:
            from cnnexp.sweep.estimate import estimate

            message = estimate(sweep)
            if message:
                say(message)
        study = optimize(sweep, recycle_after=int(sweep.settings.recycle_after))
    except RecycleProcess:
        # Same command, same process id (Slurm, Kubernetes and sweep.workers keep tracking it).
        say(f"Restarting this worker after {sweep.settings.recycle_after} trials to free memory.")
        os.environ.setdefault("CNNEXP_WORKER", "0")  # the restarted process skips the estimate
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "cnnexp.sweep", *sys.argv[1:]])
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return finish(sweep, study, report=not args.no_report)


if __name__ == "__main__":
    sys.exit(main())

"""What the terminal shows: our lines through the progress bar, library noise off unless `-v`.

Everything is printed with `tqdm.write`, so a line never lands on top of a progress bar, and
Python warnings become one plain line (`warning: ...`) instead of a file path and a source line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import textwrap
import warnings

NOISY = ("optuna", "mlflow", "alembic", "absl", "tensorflow", "jax", "urllib3", "matplotlib", "PIL", "h5py",
         "git", "sqlalchemy")


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except (BrokenPipeError, ValueError, OSError):
            _closed("stderr")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def say(text: str = "") -> None:
    """Print a line to stdout without disturbing a progress bar.

    Output to a closed pipe (`| head -n 1`) never fails a trial or the sweep: the terminal's loss is
    ignored (stdout goes to /dev/null from then on, so nothing fails at exit either), and the
    logs, the study and the runs go on being written.
    """
    from tqdm import tqdm

    try:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        _closed("stdout")


def _closed(name: str) -> None:
    """A terminal stream was closed under us: point it at /dev/null (its file descriptor too)."""
    null = open(os.devnull, "w")
    with contextlib.suppress(OSError, ValueError):
        os.dup2(null.fileno(), getattr(sys, f"__{name}__").fileno())
    setattr(sys, name, null)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm import tqdm

    try:
        tqdm.write(f"warning: {message}", file=sys.stderr)
    except (BrokenPipeError, ValueError, OSError):
        _closed("stderr")


def setup_logging(verbose: bool = False) -> None:
    """Our INFO lines and one-line warnings; libraries at WARNING (`-v`: everything, at INFO)."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # read when mlflow is first imported
        warnings.showwarning = _show_warning
        # Library warnings that say nothing the user can act on (the messages we write stay on).
        for module in ("optuna", "mlflow", "keras", "tensorflow", "matplotlib", "pydantic", "google"):
            warnings.filterwarnings("ignore", module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def table(rows: list[dict], columns: list[str], width: int = 100, max_cell: int = 40) -> str:
    """A plain-text table that fits `width` columns: NaN and None print as '-', floats short."""

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and value != value) or str(value) in ("<NA>", "nan"):
            return "-"
        if isinstance(value, float):
            value = 0.0 if abs(value) < 1e-9 else value  # no 1.9e-16 for a difference that is zero
            return f"{value:.0f}" if value.is_integer() and abs(value) >= 100 else f"{value:.4g}"
        text = str(value)
        return text if len(text) <= max_cell else text[: max_cell - 1] + "…"

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    while sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 8:
        widest = widths.index(max(widths))
        widths[widest] -= 1
    def fit(text: str, w: int) -> str:
        return text if len(text) <= w else text[: w - 1] + "…"

    lines = ["  ".join(fit(c, w).ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(fit(c, w).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def wrap(text: str, width: int = 100) -> str:
    return "\n".join(textwrap.fill(p, width) if p.strip() else "" for p in text.split("\n"))

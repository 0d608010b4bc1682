"""cnnexp: Hydra-configured Keras CNN experiments, swept with Optuna and tracked in MLflow."""

import os
import sys
from pathlib import Path

__version__ = "0.1.0"

# The project's Hydra configs and search spaces sit beside the package (a checkout, an editable install); an
# installed wheel carries its own copies inside the package (pyproject.toml), read when it runs without the repository.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_PACKAGED = Path(__file__).resolve().parent
CONF_DIR = _PACKAGED / "conf" if (_PACKAGED / "conf").is_dir() else PROJECT_ROOT / "conf"
SWEEPS_DIR = _PACKAGED / "sweeps" if (_PACKAGED / "sweeps").is_dir() else PROJECT_ROOT / "sweeps"

# `python -m cnnexp.<cli>` puts the working folder first on sys.path (argv[0] is "-m" while the
# package is imported), so a .py lying there, such as one that came with a downloaded sweep file,
# would shadow any library imported later and run its code. Our entry points import nothing from
# the working folder: drop it before anything else is imported.
if sys.argv[:1] == ["-m"] and sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

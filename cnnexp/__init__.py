"""cnnexp: Hydra-configured Keras CNN experiments, swept with Optuna and tracked in MLflow."""

from pathlib import Path

__version__ = "0.1.0"

# The project's Hydra configs and search spaces sit beside the package (installed editable).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
SWEEPS_DIR = PROJECT_ROOT / "sweeps"

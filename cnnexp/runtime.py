"""Process set-up shared by every entry point: the environment, quiet imports of Keras/TensorFlow, devices."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from cnnexp import PROJECT_ROOT

TELEMETRY_MARKER = "CNNEXP_MLFLOW_TELEMETRY"  # "config": MLFLOW_DISABLE_TELEMETRY is ours, tracking.telemetry decides


def setup_environment() -> None:
    """Set the environment every entry point needs, before Keras, TensorFlow or MLflow are imported.

    Called by the entry points (and by `keras()`, in case a library user calls in directly); each
    value is a default: whatever the user set wins.
    """
    # TensorFlow's C++ logging is configured from the environment when it is first imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow when it is installed, else JAX (GPU machines often have JAX only); KERAS_BACKEND wins.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow" if tensorflow_installed() else "jax")
    # MLflow retries an unreachable server for minutes by default; a sweep should warn and go on.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # MLflow 3 sends usage telemetry, and writes an installation id to ~/.config/mlflow/telemetry.json, from the
    # moment it is imported: off unless tracking.telemetry=true (`mlflow_telemetry`). A user's own
    # MLFLOW_DISABLE_TELEMETRY wins; the marker tells subprocesses (workers, servers) that the value is ours.
    if "MLFLOW_DISABLE_TELEMETRY" not in os.environ:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        os.environ[TELEMETRY_MARKER] = "config"
    # Matplotlib's font cache and config under the project's cache folder, not ~/.cache and ~/.config.
    os.environ.setdefault("MPLCONFIGDIR", str(cache_dir() / "matplotlib"))


def cache_dir() -> Path:
    """The project's cache folder: $CNNEXP_CACHE_DIR, else ~/.cache/cnnexp (decoded datasets, matplotlib's fonts)."""
    return Path(os.path.expanduser(os.environ.get("CNNEXP_CACHE_DIR") or "~/.cache/cnnexp"))


def mlflow_telemetry(enabled: bool) -> None:
    """`tracking.telemetry`: turn MLflow's usage telemetry on or off, before or after mlflow is imported.

    MLflow reads MLFLOW_DISABLE_TELEMETRY when it is imported and whenever its telemetry client is set up
    again; a value the user set in the environment is left alone.
    """
    if os.environ.get(TELEMETRY_MARKER) != "config":
        return
    value = "false" if enabled else "true"
    if os.environ.get("MLFLOW_DISABLE_TELEMETRY") == value:
        return
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = value
    if "mlflow" in sys.modules:
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()


def tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported here (found, not imported)."""
    return importlib.util.find_spec("tensorflow") is not None


@contextlib.contextmanager
def _stderr_to_file():
    """Hold the C-level stderr in a temporary file; give it back if something went wrong.

    TensorFlow prints oneDNN and CUDA-stub notices from C++ before its logging is set up,
    which TF_CPP_MIN_LOG_LEVEL cannot silence.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@cache
def tensorflow():
    """Import TensorFlow once, quietly (for tf.data, also under the JAX backend)."""
    setup_environment()
    with _stderr_to_file():
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    return tf


@cache
def keras():
    """Import Keras (and its backend) once, without the start-up noise, and return it."""
    setup_environment()
    with _stderr_to_file():
        import keras as _keras

        if _keras.backend.backend() == "tensorflow":
            tf = tensorflow()
            # Grow GPU memory on demand, so that several workers can share a card and an
            # out-of-memory trial fails alone; must happen before the GPU is first used.
            for gpu in tf.config.list_physical_devices("GPU"):
                with contextlib.suppress(RuntimeError):
                    tf.config.experimental.set_memory_growth(gpu, True)
    return _keras


@cache
def device_description() -> str:
    """A short description of where training runs, e.g. 'GPU: NVIDIA H100' or 'CPU: … (2 cores)'."""
    k = keras()
    if k.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"GPU: {details.get('device_name', gpus[0].name)} (x{len(gpus)})"
    elif k.backend.backend() == "jax":
        import jax

        devices = jax.devices()
        if devices[0].platform != "cpu":
            return f"{devices[0].platform.upper()}: {devices[0].device_kind} (x{len(devices)})"
    return f"CPU: {cpu_name()} ({os.cpu_count()} cores)"


def has_gpu() -> bool:
    return not device_description().startswith("CPU")


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo), e.g. avx2, avx512_bf16, amx_bf16."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def git_commit() -> str | None:
    """The commit of the working tree the code runs from, with '-dirty' if it has changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None

"""Many workers on one study: local worker processes, one per GPU when there are GPUs.

`sweep.workers=N` starts N worker processes on this machine; invocations on other machines
(Slurm array tasks, Kubernetes pods) join the same study through `sweep.storage`. The total
trial count holds across all of them: the study's storage refuses trials beyond `n_trials`
(see `cnnexp.study`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence


def visible_gpus() -> list[str]:
    """GPU ids this machine offers (CUDA_VISIBLE_DEVICES, else nvidia-smi), without importing TF."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def worker_env(index: int, gpus: list[str]) -> dict[str, str]:
    """One trial per GPU: worker i sees only GPU i (round robin when there are more workers)."""
    env = {**os.environ, "CNNEXP_WORKER": str(index), "PYTHONUNBUFFERED": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return env


def run_workers(sweep_name: str, overrides: Sequence[str], count: int, verbose: bool = False) -> int:
    """Start `count` worker processes on the study and wait for them; 130 if they were interrupted."""
    gpus = visible_gpus()
    print(f"Starting {count} workers on sweep {sweep_name!r}" + (f", GPUs {gpus}" if gpus else ", no GPU") + ".",
          flush=True)
    command = [sys.executable, "-m", "cnnexp.sweep", "--sweep", sweep_name, "--no-report", *(["-v"] if verbose else []),
               *overrides, "sweep.workers=1", "sweep.estimate=false"]
    procs = [subprocess.Popen(command, env=worker_env(i, gpus)) for i in range(count)]

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if any(code in (130, -signal.SIGTERM) for code in codes):
        print("Workers were interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    if any(code == 2 for code in codes):
        return 2
    return 0

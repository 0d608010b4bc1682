#!/usr/bin/env bash
# Submit a sweep as a Slurm job array: each array task is one worker on the shared study.
# Resources live here, in one place; override any of them from the environment:
#   WORKERS=8 GPUS_PER_WORKER=1 TIME=08:00:00 SWEEP=seed_questions sweeps/slurm/submit.sh
# The study and the MLflow server are shared through URLs (PostgreSQL and an MLflow server):
#   SWEEP_STORAGE=postgresql://user:pass@db-host/optuna MLFLOW_TRACKING_URI=http://mlflow-host:5000
set -euo pipefail
cd "$(dirname "$0")/../.."

WORKERS=${WORKERS:-4}                 # array tasks = workers = GPUs in use at once
GPUS_PER_WORKER=${GPUS_PER_WORKER:-1} # one trial per GPU; 0 on CPU-only partitions
CPUS_PER_WORKER=${CPUS_PER_WORKER:-4}
MEM_PER_WORKER=${MEM_PER_WORKER:-16G}
TIME=${TIME:-04:00:00}
PARTITION=${PARTITION:-}
SWEEP=${SWEEP:-seed_questions}
export SWEEP SWEEP_STORAGE="${SWEEP_STORAGE:-}" SWEEP_ARGS="${SWEEP_ARGS:-}" MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-}"

name=$(basename "$SWEEP" .yaml)   # SWEEP may be a name in sweeps/ or a path to a YAML
mkdir -p outputs/slurm
args=(--array="0-$((WORKERS - 1))" --cpus-per-task="$CPUS_PER_WORKER" --mem="$MEM_PER_WORKER" --time="$TIME"
      --job-name="cnnexp-$name" --output="outputs/slurm/%x-%A_%a.out" --parsable)
[ "$GPUS_PER_WORKER" -gt 0 ] && args+=(--gpus-per-task="$GPUS_PER_WORKER")
[ -n "$PARTITION" ] && args+=(--partition="$PARTITION")
exec sbatch "${args[@]}" "$@" sweeps/slurm/sweep_array.sbatch

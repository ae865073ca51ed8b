#!/usr/bin/env bash
# Single node: every local GPU through the DeepSpeed launcher, or NPROC CPU processes (gloo) where there
# is none. Arguments are Hydra overrides:  launch/local.sh stage=warmup stage.steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-}
if [ -n "$NPROC" ] && ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC=$NPROC; allowed: a positive whole number of processes (or empty: one per GPU, else 1)" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L | wc -l)
  if [ "${NPROC:-$GPUS}" -gt "$GPUS" ]; then
    echo "error: NPROC=$NPROC; this node has $GPUS GPU(s): allowed 1..$GPUS (more nodes: launch/deepspeed_multinode.sh)" >&2
    exit 2
  fi
  exec "$PY" -m deepspeed.launcher.runner --no_local_rank --num_gpus "${NPROC:-$GPUS}" --module train "$@"
elif CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) && [ "${NPROC:-1}" -gt "$CPUS" ]; then
  # (nproc alone answers OMP_NUM_THREADS, which users set to 1 for exactly these multi-process runs)
  echo "error: NPROC=$NPROC; this node has no GPU and $CPUS CPU(s): allowed 1..$CPUS CPU processes" >&2
  exit 2
elif [ "${NPROC:-1}" -gt 1 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m train "$@"
else
  exec "$PY" -m train "$@"
fi

#!/usr/bin/env bash
# Multi-node through torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 RDZV=host0:29500 NPROC_PER_NODE=8 launch/torchrun.sh stage=warmup run.name=v32 ...
# NPROC_PER_NODE defaults to the node's GPU count (1 CPU process where there is none). Fix run.name on the
# command line: every rank must resolve the same run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GPUS=$( (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | wc -l) || echo 0)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${RDZV:?set RDZV=host:port (node 0)}"
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV" --rdzv-id "${RDZV_ID:-dsa}" -m train "$@"

#!/usr/bin/env bash
# Multi-node through the DeepSpeed launcher and a hostfile (lines like `node1 slots=8`). From node 0, with
# passwordless ssh to the others:
#   HOSTFILE=hosts MASTER_ADDR=node1 launch/deepspeed_multinode.sh stage=sparse run.name=v32 ...
# Without ssh, start it on each node with NODE_RANK=<i> (uses --no_ssh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
: "${HOSTFILE:?set HOSTFILE}" "${MASTER_ADDR:?set MASTER_ADDR}"
extra=()
[ -n "${NODE_RANK:-}" ] && extra=(--no_ssh --node_rank "$NODE_RANK")
exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --no_local_rank "${extra[@]}" --module train "$@"

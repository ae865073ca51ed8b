#!/usr/bin/env bash
# The training path under each kernel backend, through the launcher users run. A tiny model with 64 heads, a
# 128-wide latent and 64 rope dims (about the smallest shape on which TileLang's warp-specialised sparse MLA
# runs) is trained from scratch (stage=base) and its indexers warmed up; then its sparse stage runs once per
# backend from the same warm-up export. Prints the per-step LM loss and indexer KL of each backend and their
# largest difference from the first backend's (the PyTorch twins by default).
#   bench/backends.sh [OUT_DIR] [BACKENDS...]      (defaults: checkpoints/backends; reference triton tilelang)
# Extra Hydra overrides for every stage go in ARGS="..."; STEPS="300 100 60" sets the base, warm-up and sparse
# steps; LATENT=512 gives the model DeepSeek's latent rows (512 + 64 rope), the shape cuDNN's sparse MLA backward
# takes (DSA_KERNELS=cudnn). On a GPU machine, bf16 (deepspeed.bf16=auto).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-checkpoints/backends}
shift || true
BACKENDS=("${@:-reference triton tilelang}")
read -r -a BACKENDS <<<"${BACKENDS[*]}"
COMMON=(run.root="$OUT" logging.wandb.mode=disabled data.seq_len=512 model.index_head_dim=64 ${ARGS:-})
read -r STEPS_BASE STEPS_WARMUP STEPS_SPARSE <<<"${STEPS:-300 100 60}"
LATENT=${LATENT:-128}
ARCH=(model.arch.num_attention_heads=64 model.arch.num_key_value_heads=64 model.arch.kv_lora_rank=$LATENT
      model.arch.qk_rope_head_dim=64 model.arch.max_position_embeddings=512)
echo "== base (tiny model, 64 heads, latent $LATENT, rope 64)"
launch/local.sh stage=base run.name=base stage.steps=$STEPS_BASE "${ARCH[@]}" "${COMMON[@]}"
echo "== warm-up"
launch/local.sh stage=warmup run.name=tiny model.path="$OUT/base/base/export" stage.steps=$STEPS_WARMUP "${COMMON[@]}"
for b in "${BACKENDS[@]}"; do
  echo "== sparse, DSA_KERNELS=$b"
  DSA_KERNELS=$b launch/local.sh stage=sparse run.name="sparse-$b" model.path="$OUT/base/base/export" \
    stage.init_from="$OUT/tiny/warmup/export" stage.steps=$STEPS_SPARSE stage.log_every=1 "${COMMON[@]}"
done
"$PY" - "$OUT" "${BACKENDS[@]}" <<'PY'
import json, sys
out, backends = sys.argv[1], sys.argv[2:]
rows = {b: [json.loads(r) for r in open(f"{out}/sparse-{b}/sparse/metrics.jsonl")] for b in backends}
keys = ("loss/lm", "loss/indexer_kl")
print("step " + " ".join(f"{b + ' ' + k.split('/')[1]:>22}" for b in backends for k in keys))
n = min(len(r) for r in rows.values())  # a run cut short compares over the steps all of them logged
for i in range(n):
    if i % 10 == 0 or i == n - 1:
        print(f"{rows[backends[0]][i]['step']:>4} " + " ".join(f"{rows[b][i][k]:>22.5f}" for b in backends for k in keys))
base = backends[0]
for b in backends[1:]:
    for k in keys:
        d = max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-8) for x, y in zip(rows[b][:n], rows[base][:n]))
        print(f"{b} vs {base}: {k} largest relative difference over {n} steps: {d:.2e}")
PY

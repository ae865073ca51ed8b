"""Launch real stage runs (subprocesses, CPU/gloo) on a tiny synthetic setup."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY_MODEL = [
    "model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.moe_intermediate_size=32",
    "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=2", "model.arch.q_lora_rank=32",
    "model.arch.kv_lora_rank=32", "model.arch.qk_nope_head_dim=16", "model.arch.qk_rope_head_dim=8",
    "model.arch.v_head_dim=16", "model.index_n_heads=2", "model.index_head_dim=16", "model.index_topk=16",
]
TINY_DATA = [
    "data.synthetic.num_train_docs=48", "data.synthetic.num_valid_docs=4", "data.synthetic.doc_words=127",
    "data.synthetic.facts_per_doc=4", "data.synthetic.recall_distance=64", "data.seq_len=128",
]


def tiny_overrides(root: Path, model: list[str] = TINY_MODEL) -> list[str]:
    return [f"run.root={root}/ckpt", f"data.generated_dir={root}/data", f"data.cache_dir={root}/token_cache",
            "logging.wandb.mode=disabled",
            "stage.global_batch=4", "stage.log_every=1", *model, *TINY_DATA]


def run_train(root: Path, *overrides: str, nproc: int = 1, check: bool = True, timeout: int = 600,
              model: list[str] = TINY_MODEL):
    if nproc == 1:
        cmd = [sys.executable, "-m", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd + tiny_overrides(root, model) + list(overrides), capture_output=True, text=True, cwd=ROOT,
                         timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def metrics(root: Path, run: str, stage: str) -> list[dict]:
    path = root / "ckpt" / run / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def readme_block(heading: str, lang: str) -> str:
    """The first ```lang block after `heading` in the README: what tests run as a user would."""
    text = (ROOT / "README.md").read_text()
    return re.search(rf"```{lang}\n(.*?)```", text[text.index(heading):], re.S).group(1)

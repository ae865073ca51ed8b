"""A user's own checkpoint, start to finish, as the README tells it: a small model of each family a user brings most
(a MoE `DeepseekV3ForCausalLM`, a Qwen3, a DeepSeek-V2-Lite-style MLA without a query latent) saved in bf16 with a
BPE tokenizer trained on real text; the README's "Your own checkpoint" block run as written (plan, warm-up,
sparse, eval through make, in a scratch copy of the repository); then the README's transformers snippet on the
export."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import ROOT, readme_block
from tests.integration.user_source import build_user_source


def _scratch_copy(dst: Path) -> Path:
    """The tracked files of the repository (mtimes kept, so make sees an installed environment as current)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return dst


# (family, the plan's kernel line on CPU, the export's model_type); DeepSeek-V2's run is in the slow suite (its
# parity and export are in the fast one, tests/unit/test_families.py)
FAMILIES = [("deepseek_v3", "sparse MLA: reference", "deepseek_v32"), ("qwen3", "sparse GQA: reference", "dsa"),
            pytest.param("deepseek_v2", "sparse MLA: reference", "dsa", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family, kernels, export_type", FAMILIES)
def test_readme_conversion_of_a_users_bf16_checkpoint(family, kernels, export_type, tmp_path):
    user = build_user_source(tmp_path / "user", family=family)
    repo = _scratch_copy(tmp_path / "repo")
    script = readme_block("## Your own checkpoint", "bash")
    for placeholder, value in (("/ckpt/my-model", user["src"]), ("/data/corpus", user["corpus"]),
                               ("/data/held-out.jsonl", user["held_out"])):
        assert placeholder in script
        script = script.replace(placeholder, str(value))
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "VENV": str(venv), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "[plan] preset paper" in out.stdout and "top-64 of 256" in out.stdout
    assert f"[plan] kernels: DSA_KERNELS=auto; {kernels}; indexer top-k: in the weights dtype (model.index_dtype=auto)" \
        in out.stdout  # CPU: the twins; FP8 only on Hopper GPUs
    assert "[plan] training FLOPs per token" in out.stdout  # make plan, before the warm-up
    assert "[summary] sparse" in out.stdout

    run = repo / "checkpoints" / "mine"
    # The warm-up export's backbone is the source's, bit for bit, in the source's dtype (bf16).
    from safetensors.torch import load_file

    src = load_file(user["src"] / "model.safetensors")
    warm = load_file(run / "warmup" / "export" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in warm.values())
    assert all(torch.equal(warm[k], v) for k, v in src.items()), "backbone changed"
    assert sum(".indexer." in k for k in warm) == 5 * 4
    # The sparse stage ran at the export's top-k, with a selection that drops attention (recall below 1).
    sparse_cfg = json.loads((run / "sparse" / "export" / "config.json").read_text())
    assert sparse_cfg["index_topk"] == 64 and sparse_cfg["dtype"] == "bfloat16"
    assert sparse_cfg["model_type"] == export_type
    rows = [json.loads(line) for line in (run / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["indexer/recall"] < 1 and "eval/sparse_lm_loss" in rows[-1]
    assert (run / "sparse" / "export" / "tokenizer.json").is_file()
    # make eval compared the export with the source on the held-out text, in both modes.
    result = json.loads(out.stdout[out.stdout.index("{\n"):out.stdout.rindex("\n}") + 2])
    assert result["model"]["indexer_recall"] < 1 and "sparse_lm_loss" in result["model"]
    assert "retrieval_accuracy" not in json.dumps(result)  # a synthetic-corpus metric only

    # The README's transformers snippet, on this export: sparse-mode logits and greedy generation.
    snippet = readme_block("With transformers (sparse mode", "python")
    snippet = snippet.replace("checkpoints/default/sparse/export", str(run / "sparse" / "export"))
    gen = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.strip().startswith("SET k17 v9"), gen.stdout

"""The main job, whole: the embedded default's base -> warm-up -> sparse -> eval, as `make base warmup sparse eval`
runs them (one process, the default config) in a temporary run root and data folder.

Marked slow (about 12 minutes on 2 CPU cores): `make test-all`. It pins what the conversion must show, with
tolerances that hold across CPUs (floating-point order differs between machines, so the README's table is not
reproduced to its last digit everywhere): the warm-up halves the indexer KL and ends with recall >= 0.95, and
the converted model in sparse mode stays within 5% of the base model's perplexity and within 2.5 points of its
retrieval accuracy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT, readme_block


def _run(args: list[str], timeout: int = 1800) -> None:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, f"{args}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"


def _tenths(rows: list[dict], key: str) -> tuple[float, float]:
    """Means of `key` over the first and the last 10% of the logged steps."""
    values = [m[key] for m in rows if key in m]
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


@pytest.mark.slow
def test_main_job_converts_the_embedded_default(tmp_path: Path):
    common = [f"run.root={tmp_path}/ckpt", f"data.generated_dir={tmp_path}/data",
              f"data.cache_dir={tmp_path}/cache", "logging.wandb.mode=disabled", "logging.progress=false"]
    _run(["-m", "train", "stage=base", "run.name=base", *common])
    _run(["-m", "train", "stage=warmup", *common])
    _run(["-m", "train", "stage=sparse", *common])
    out = tmp_path / "eval.json"
    _run(["-m", "train.eval", "--model", f"{tmp_path}/ckpt/default/sparse/export",
          "--baseline", f"{tmp_path}/ckpt/base/base/export", "--out", str(out)])
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))  # the figures, for the README's table

    warm = [json.loads(line) for line in (tmp_path / "ckpt/default/warmup/metrics.jsonl").read_text().splitlines()]
    kl_first, kl_last = _tenths(warm, "loss/indexer_kl")
    _, recall_last = _tenths(warm, "indexer/recall")
    assert kl_last < 0.6 * kl_first, (kl_first, kl_last)
    assert recall_last >= 0.95, recall_last

    model, base = result["model"], result["baseline"]
    assert model["indexer_recall"] >= 0.95, model["indexer_recall"]
    assert abs(result["sparse_perplexity_vs_baseline_dense"] - 1) <= 0.05, result
    assert abs(result["sparse_retrieval_accuracy_delta_points"]) <= 2.5, result
    # the base model learned the task, and the converted model's dense mode is still the base model's
    assert base["dense_retrieval_accuracy"] > 0.2, base
    assert abs(model["dense_lm_loss"] - base["dense_lm_loss"]) <= 0.05 * base["dense_lm_loss"], (model, base)

    # The README's transformers snippet runs on the export as written (its default path replaced).
    snippet = readme_block("With transformers (sparse mode", "python")
    snippet = snippet.replace("checkpoints/default/sparse/export", f"{tmp_path}/ckpt/default/sparse/export")
    gen = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and gen.stdout.startswith("SET k17 v9"), gen.stderr[-3000:]

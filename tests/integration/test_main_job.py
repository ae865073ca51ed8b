"""The main job, whole: the embedded default's base -> warm-up -> sparse -> eval, pinned to the README's figures.

Marked slow (10 minutes on 2 CPU cores): `make test-all`. The stages run exactly as `make base warmup
sparse eval` runs them (one process, the default config), in a temporary run root and data folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT

# The README's evaluation table (`make warmup sparse eval` on a 2-core CPU).
README = {
    ("baseline", "dense_lm_loss"): 4.2163, ("baseline", "dense_retrieval_accuracy"): 0.2810,
    ("model", "dense_lm_loss"): 4.1946, ("model", "dense_retrieval_accuracy"): 0.2824,
    ("model", "sparse_lm_loss"): 4.1953, ("model", "sparse_retrieval_accuracy"): 0.2820,
    ("model", "indexer_recall"): 0.956, ("model", "indexer_kl"): 0.743,
}


def _run(args: list[str], timeout: int = 1800) -> None:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, f"{args}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"


@pytest.mark.slow
def test_main_job_reproduces_the_readme(tmp_path: Path):
    common = [f"run.root={tmp_path}/ckpt", f"data.generated_dir={tmp_path}/data",
              f"data.cache_dir={tmp_path}/cache", "logging.wandb.mode=disabled", "logging.progress=false"]
    _run(["-m", "train", "stage=base", "run.name=base", *common])
    _run(["-m", "train", "stage=warmup", *common])
    _run(["-m", "train", "stage=sparse", *common])
    out = tmp_path / "eval.json"
    _run(["-m", "train.eval", "--model", f"{tmp_path}/ckpt/default/sparse/export",
          "--baseline", f"{tmp_path}/ckpt/base/base/export", "--data", f"{tmp_path}/data/valid.jsonl",
          "--out", str(out)])
    result = json.loads(out.read_text())
    got = {key: result[key[0]][key[1]] for key in README}
    # The README rounds losses to 4 decimals, accuracies to 0.01 points, recall and KL to 3 decimals.
    for key, want in README.items():
        places = 3 if key[1].startswith("indexer") else 4
        assert round(got[key], places) == pytest.approx(want, abs=10**-places / 2 + 1e-9), (key, got[key])
    # The warm-up's curves, as the README describes them: KL down by about half, recall up.
    warm = [json.loads(line) for line in (tmp_path / "ckpt/default/warmup/metrics.jsonl").read_text().splitlines()]
    kl = [m["loss/indexer_kl"] for m in warm if "loss/indexer_kl" in m]
    tenth = max(1, len(kl) // 10)
    assert sum(kl[-tenth:]) / tenth < 0.6 * sum(kl[:tenth]) / tenth

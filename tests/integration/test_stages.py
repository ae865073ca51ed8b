"""End-to-end stage runs on CPU (gloo): tiny base -> warm-up -> sparse, with the guarantees each stage makes."""

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.helpers import metrics, run_train

WARMUP_KEYS = {"loss/indexer_kl", "indexer/recall", "indexer/kl_per_layer/0", "indexer/kl_per_layer/1", "lr",
               "tokens/step", "tokens/total", "perf/tokens_per_sec", "mem/peak_gib", "data/epoch"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny dense base model (3 steps) that the warm-up converts."""
    root = tmp_path_factory.mktemp("run")
    run_train(root, "stage=base", "run.name=base", "stage.steps=3")
    return root


def _weights(path):
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_warmup_trains_indexers_only_and_logs_everything(root):
    out = run_train(root, "stage=warmup", "run.name=w1", "stage.steps=4", "stage.save_every=2")
    assert "step 4/4" in out.stdout and "indexer_kl" in out.stdout  # progress line on rank 0
    rows = metrics(root, "w1", "warmup")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert WARMUP_KEYS <= set(rows[0])
    assert "loss/lm" not in rows[0], "the warm-up has no LM loss"
    assert [r["tokens/total"] for r in rows] == [512 * s for s in (1, 2, 3, 4)]
    assert all(r["loss/indexer_kl"] > 0 and 0 < r["indexer/recall"] <= 1 for r in rows)

    base = _weights(root / "ckpt/base/base/export")
    export = _weights(root / "ckpt/w1/warmup/export")
    for key, value in base.items():
        assert torch.equal(export[key], value), f"backbone tensor {key} changed in the warm-up"
    new = sorted(set(export) - set(base))
    assert new and all(".self_attn.indexer." in k for k in new)
    assert (root / "ckpt/w1/warmup/ckpt/latest").read_text().strip() == "step4"

    # The optimizer holds state for exactly the indexer parameters.
    (optim_file,) = (root / "ckpt/w1/warmup/ckpt/step4").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    states = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    fp32 = states["single_partition_of_fp32_groups"]
    indexer_numel = sum(v.numel() for k, v in export.items() if ".indexer." in k)
    assert sum(t.numel() for t in fp32) == indexer_numel


def test_two_ranks_match_one_rank(root):
    run_train(root, "stage=warmup", "run.name=r1", "stage.steps=3")
    run_train(root, "stage=warmup", "run.name=r2", "stage.steps=3", nproc=2)
    one, two = metrics(root, "r1", "warmup"), metrics(root, "r2", "warmup")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a["loss/indexer_kl"] - b["loss/indexer_kl"]) <= 1e-5
        assert abs(a["indexer/recall"] - b["indexer/recall"]) <= 1e-5
        assert a["tokens/total"] == b["tokens/total"]


def test_sparse_starts_from_the_warmup_export(root):
    run_train(root, "stage=warmup", "run.name=s1", "stage.steps=2")
    run_train(root, "stage=sparse", "run.name=s1", "stage.steps=2", "stage.lr=1e-3")
    rows = metrics(root, "s1", "sparse")
    assert {"loss/lm", "loss/indexer_kl", "indexer/kl_per_layer/1"} <= set(rows[0])
    warm = _weights(root / "ckpt/s1/warmup/export")
    sparse = _weights(root / "ckpt/s1/sparse/export")
    changed = [k for k in warm if not torch.equal(warm[k], sparse[k])]
    assert any(".indexer." in k for k in changed) and any(".indexer." not in k for k in changed)


def test_relaunch_resumes_where_it_stopped(root):
    run_train(root, "stage=warmup", "run.name=full", "stage.steps=4", "stage.save_every=2")
    run_train(root, "stage=warmup", "run.name=cut", "stage.steps=2", "stage.save_every=2")
    out = run_train(root, "stage=warmup", "run.name=cut", "stage.steps=4", "stage.save_every=2")
    assert "[resume]" in out.stdout and "at step 2" in out.stdout
    full, cut = metrics(root, "full", "warmup"), metrics(root, "cut", "warmup")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut):
        for key in ("loss/indexer_kl", "indexer/recall", "tokens/total", "indexer/kl_per_layer/1"):
            assert a[key] == b[key], (a["step"], key)  # bit-identical on CPU


def test_wandb_offline_run_is_written(root):
    run_train(root, "stage=warmup", "run.name=wb", "stage.steps=1", "logging.wandb.mode=offline")
    runs = list((root / "ckpt/wb/warmup/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_non_finite_loss_stops_the_run_naming_step_and_term(root):
    out = run_train(root, "stage=sparse", "stage.init_from=" + str(root / "ckpt/base/base/export"), "run.name=nan",
                    "stage.steps=4", "stage.lr=1e30", "stage.grad_clip=0", check=False)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "error: step 2: non-finite loss/lm = nan" in out.stderr and "Traceback" not in out.stderr
    assert "indexer/kl_per_layer/" in out.stderr


def test_non_finite_steps_are_skipped_and_counted(root):
    """on_nonfinite=skip: steps 2-4 diverge (lr 1e30) and are skipped; the weights stay those after step 1."""
    common = ("stage=sparse", "stage.init_from=" + str(root / "ckpt/base/base/export"), "stage.lr=1e30",
              "stage.grad_clip=0")
    run_train(root, *common, "run.name=one_step", "stage.steps=1")
    out = run_train(root, *common, "run.name=skip", "stage.steps=4", "stage.on_nonfinite=skip")
    assert "[skip] step 2: non-finite loss/lm" in out.stdout and "(3 so far, 3 in a row)" in out.stdout
    rows = metrics(root, "skip", "sparse")
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["tokens/total"] == 4 * 4 * 128  # skipped batches are consumed and counted, not replayed
    one = _weights(root / "ckpt/one_step/sparse/export")
    skipped = _weights(root / "ckpt/skip/sparse/export")
    assert all(torch.equal(skipped[k], v) for k, v in one.items()), "a skipped step must not change the weights"

    out = run_train(root, *common, "run.name=too_many", "stage.steps=4", "stage.on_nonfinite=skip",
                    "stage.max_skipped_steps=2", check=False)
    assert out.returncode == 3 and "step 3: 2 consecutive steps skipped" in out.stderr, out.stderr[-2000:]

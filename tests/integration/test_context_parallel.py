"""Context parallelism on CPU (gloo): each sequence split over 2 or 4 ranks trains what one rank trains, in both
stages, under ZeRO-1 and ZeRO-3, with data parallelism beside it; a SIGKILL and relaunch under it is
bit-identical; a degree that does not fit stops before any work."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.integration.helpers import ROOT, metrics, run_train, tiny_overrides

VOLATILE = {"time", "perf/tokens_per_sec", "mem/peak_gib"}
# name: (ranks, context-parallel degree); the global batch (4 sequences of 128 tokens) is the same for all
LAYOUTS = {"cp2": (2, 2), "cp4": (4, 4), "dp2cp2": (4, 2)}
KEYS = {"warmup": ("loss/indexer_kl", "indexer/recall", "train/grad_norm"),
        "sparse": ("loss/lm", "loss/indexer_kl", "indexer/recall", "train/grad_norm")}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    run_train(root, "stage=base", "run.name=base", "stage.steps=2")
    return root


def _both_stages(root, name: str, nproc: int, *extra: str) -> None:
    run_train(root, "stage=warmup", f"run.name={name}", "stage.steps=2", *extra, nproc=nproc)
    run_train(root, "stage=sparse", f"run.name={name}", "stage.steps=2", "stage.lr=1e-3", *extra, nproc=nproc)


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    """Within `rel`, or 1e-8 apart: this tiny model's KL is ~5e-5, a difference of terms of order log(128)
    whose fp32 rounding (~5e-7 x 1e-3 of them) alone moves it by a few 1e-10 when ranks sum in another order."""
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), 1e-8)


@pytest.mark.parametrize("zero, layouts", [
    ("zero1", ("cp2",)),
    # context and data parallelism together (minutes on a 2-core CPU): `make test-all`
    pytest.param("zero1", ("dp2cp2",), marks=pytest.mark.slow, id="zero1-dp2cp2"),
    # ZeRO-3 reduces differently: context and data parallelism together (ZeRO-3 alone: tests/integration/test_scale.py)
    pytest.param("zero3", ("dp2cp2",), marks=pytest.mark.slow, id="zero3-dp2cp2"),
    # 4 ranks of one sequence on a 2-core CPU take minutes: `make test-all`
    pytest.param("zero1", ("cp4",), marks=pytest.mark.slow, id="zero1-cp4"),
    pytest.param("zero3", ("cp2", "cp4"), marks=pytest.mark.slow, id="zero3-cp2-cp4"),
])
def test_context_parallel_trains_what_one_rank_trains(root, zero, layouts):
    if not (root / f"ckpt/one_{zero}/sparse/export").exists():
        _both_stages(root, f"one_{zero}", 1, f"deepspeed={zero}")
    for layout in layouts:
        nproc, cp = LAYOUTS[layout]
        _both_stages(root, f"{layout}_{zero}", nproc, f"deepspeed={zero}", f"deepspeed.context_parallel={cp}")
        for stage, keys in KEYS.items():
            want, got = metrics(root, f"one_{zero}", stage), metrics(root, f"{layout}_{zero}", stage)
            assert [r["tokens/total"] for r in got] == [r["tokens/total"] for r in want] == [512, 1024]
            # The sparse stage's recall comes from a probe on each data-parallel rank's first sequence: with two
            # data-parallel ranks it averages two sequences, so it is compared where one rank reads all.
            probe = stage == "sparse" and nproc // cp > 1
            for a, b in zip(want, got, strict=True):
                for key in (k for k in keys if not (probe and k == "indexer/recall")):
                    assert _close(a[key], b[key]), (layout, zero, stage, key, a[key], b[key])
            w1 = load_file(root / f"ckpt/one_{zero}/{stage}/export/model.safetensors")
            wn = load_file(root / f"ckpt/{layout}_{zero}/{stage}/export/model.safetensors")
            assert w1.keys() == wn.keys()
            assert max((w1[k].float() - wn[k].float()).abs().max().item() for k in w1) <= 1e-5, (layout, stage)


@pytest.mark.slow
def test_context_parallel_recomputes_checkpointed_layers_with_their_gathers(root):
    """Under activation checkpointing each layer's recomputation gathers the keys again, on every rank in the same
    order: the sparse stage at CP=2 trains what one rank trains."""
    for name, nproc, extra in (("ac_one", 1, []), ("ac_cp2", 2, ["deepspeed.context_parallel=2"])):
        run_train(root, "stage=sparse", f"run.name={name}", "stage.steps=2", "stage.lr=1e-3",
                  "stage.activation_checkpointing=true", f"stage.init_from={root}/ckpt/base/base/export", *extra,
                  nproc=nproc)
    for a, b in zip(metrics(root, "ac_one", "sparse"), metrics(root, "ac_cp2", "sparse"), strict=True):
        for key in KEYS["sparse"]:
            assert _close(a[key], b[key]), (key, a[key], b[key])


@pytest.mark.slow  # CI keeps the sigkill-and-relaunch test without context parallelism (test_scale.py)
def test_sigkill_under_context_parallelism_then_relaunch_is_bit_identical(root):
    args = ("stage=warmup", "stage.steps=6", "stage.save_every=1", "deepspeed.context_parallel=2")
    run_train(root, *args, "run.name=cp_straight", nproc=2)
    kill_after = random.Random(os.getpid()).randint(2, 4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *tiny_overrides(root), *args, "run.name=cp_killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    log = root / "ckpt/cp_killed/warmup/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < kill_after):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
    proc.wait()
    out = run_train(root, *args, "run.name=cp_killed", nproc=2)
    assert "[resume]" in out.stdout
    stable = [{k: v for k, v in r.items() if k not in VOLATILE} for r in metrics(root, "cp_killed", "warmup")]
    assert stable == [{k: v for k, v in r.items() if k not in VOLATILE}
                      for r in metrics(root, "cp_straight", "warmup")], f"killed after {kill_after} logged steps"
    assert stable[-1]["tokens/total"] == 6 * 4 * 128


@pytest.mark.parametrize("extra, message", [
    (["deepspeed.context_parallel=3"], "deepspeed.context_parallel=3 does not divide the 2 ranks"),
    (["deepspeed.context_parallel=2", "data.seq_len=126"],
     "deepspeed.context_parallel=2: data.seq_len=126 must split into 2 x 2 equal chunks"),
])
def test_a_context_parallel_degree_that_does_not_fit_stops_before_any_work(root, extra, message):
    out = run_train(root, "stage=warmup", "run.name=cp_bad", "stage.steps=2", *extra, nproc=2, check=False)
    assert out.returncode != 0, out.stderr[-2000:]  # the ranks exit 2; the launcher reports 1
    assert message in out.stderr
    assert not (root / "ckpt/cp_bad").exists()


@pytest.mark.slow
def test_a_users_bf16_moe_checkpoint_on_files_under_context_parallelism(tmp_path):
    """The README's own-checkpoint path (a bf16 MoE DeepseekV3ForCausalLM with its BPE tokenizer, data=files, held-out
    evaluation) through the launcher with OMP_NUM_THREADS=1 as users set it: two CPU ranks splitting each sequence
    train what one rank trains in both stages (bf16 weights: within 1e-3), with the same tokens counted."""
    from tests.integration.user_source import build_user_source

    user = build_user_source(tmp_path / "user")
    args = ["model=deepseek_v3", f"model.path={user['src']}", "data=files", f"data.sources.0.path={user['corpus']}",
            f"data.held_out={user['held_out']}", "data.seq_len=256", "model.index_topk=64", "stage.steps=4",
            "stage.global_batch=4", "stage.log_every=2", "stage.eval_every=2", f"run.root={tmp_path}/ckpt",
            f"data.cache_dir={tmp_path}/token_cache", "logging.wandb.mode=disabled"]
    for name, nproc, extra in (("one", "1", []), ("cp2", "2", ["deepspeed.context_parallel=2"])):
        for stage in ("warmup", "sparse"):
            out = subprocess.run(["bash", "launch/local.sh", f"stage={stage}", f"run.name={name}", *args, *extra],
                                 capture_output=True, text=True, cwd=ROOT, timeout=600,
                                 env={**os.environ, "NPROC": nproc, "OMP_NUM_THREADS": "1"})
            assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    for stage, keys in KEYS.items():
        want, got = metrics(tmp_path, "one", stage), metrics(tmp_path, "cp2", stage)
        assert [r["tokens/total"] for r in got] == [r["tokens/total"] for r in want] == [2048, 4096]
        for a, b in zip(want, got, strict=True):
            for key in (*keys, "eval/sparse_lm_loss"):
                assert _close(a[key], b[key], rel=1e-3), (stage, key, a[key], b[key])


# A tiny Llama-shaped GQA model (4 query heads over 2 key heads of 16) in place of the MLA one
GQA_MODEL = ["model=synthetic_llama", "model.path=${run.root}/gqa_base/base/export", "model.arch.hidden_size=32",
             "model.arch.intermediate_size=64", "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2",
             "model.arch.head_dim=16", "model.index_n_heads=2", "model.index_head_dim=16", "model.index_topk=16"]


@pytest.mark.slow
def test_context_parallel_of_a_gqa_model_trains_what_one_rank_trains(tmp_path):
    """GQA under context parallelism: the key heads' keys and values are gathered, the rest as for MLA."""
    run_train(tmp_path, "stage=base", "run.name=gqa_base", "stage.steps=2", model=GQA_MODEL)
    for name, nproc, extra in (("gqa_one", 1, ()), ("gqa_cp2", 2, ("deepspeed.context_parallel=2",))):
        for stage in ("warmup", "sparse"):
            run_train(tmp_path, f"stage={stage}", f"run.name={name}", "stage.steps=2", "stage.lr=1e-3", *extra,
                      nproc=nproc, model=GQA_MODEL)
    for stage, keys in KEYS.items():
        want, got = metrics(tmp_path, "gqa_one", stage), metrics(tmp_path, "gqa_cp2", stage)
        assert [r["tokens/total"] for r in got] == [r["tokens/total"] for r in want] == [512, 1024]
        for key in keys:
            assert all(_close(g[key], w[key], 1e-4) for g, w in zip(got, want)), (stage, key, got, want)

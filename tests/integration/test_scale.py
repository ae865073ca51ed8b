"""Runs that scale and survive failure: two 'nodes' on one machine, ZeRO-3 in both stages, SIGKILL and
relaunch with bit-identical metrics, a half-written checkpoint, checkpoint rotation."""

import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.helpers import ROOT, metrics, run_train, tiny_overrides

VOLATILE = {"time", "perf/tokens_per_sec", "mem/peak_gib"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    run_train(root, "stage=base", "run.name=base", "stage.steps=2")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_two_nodes_match_one_process(root):
    run_train(root, "stage=warmup", "run.name=one", "stage.steps=3")
    port = _free_port()
    env = {**os.environ, "NNODES": "2", "RDZV": f"127.0.0.1:{port}", "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    args = ["launch/torchrun.sh", *tiny_overrides(root), "stage=warmup", "run.name=two", "stage.steps=3"]
    procs = [subprocess.Popen(args, cwd=ROOT, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    one, two = metrics(root, "one", "warmup"), metrics(root, "two", "warmup")
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss/indexer_kl"] - b["loss/indexer_kl"]) <= 1e-5
        assert a["tokens/total"] == b["tokens/total"]


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def test_zero3_warmup_and_sparse_match_zero1(root):
    """ZeRO-3 (frozen backbone in the warm-up included) trains exactly what ZeRO-1 trains, with gradient
    accumulation (4 micro-batches per rank): same losses and gradient norms, same exported weights."""
    for zero in ("zero3", "zero1"):
        run_train(root, "stage=warmup", f"run.name={zero}", "stage.steps=2", f"deepspeed={zero}",
                  "stage.global_batch=8", nproc=2)
        run_train(root, "stage=sparse", f"run.name={zero}", "stage.steps=2", f"deepspeed={zero}", "stage.lr=1e-3",
                  "stage.global_batch=8", nproc=2)
    for stage, key in (("warmup", "loss/indexer_kl"), ("sparse", "loss/lm")):
        z3, z1 = metrics(root, "zero3", stage), metrics(root, "zero1", stage)
        for a, b in zip(z3, z1, strict=True):
            assert _close(a[key], b[key]) and _close(a["train/grad_norm"], b["train/grad_norm"]), (stage, a, b)
        w3 = load_file(root / f"ckpt/zero3/{stage}/export/model.safetensors")
        w1 = load_file(root / f"ckpt/zero1/{stage}/export/model.safetensors")
        assert w3.keys() == w1.keys()
        assert max((w3[k] - w1[k]).abs().max().item() for k in w1) <= 1e-6, stage
    base = load_file(root / "ckpt/base/base/export/model.safetensors")
    warm = load_file(root / "ckpt/zero3/warmup/export/model.safetensors")
    assert all(torch.equal(warm[k], v) for k, v in base.items()), "ZeRO-3 export: backbone unchanged"


def test_activation_checkpointing_trains_the_same_under_zero3(root):
    """Checkpointed layers (recomputed in backward, each keeping its top-k for the recomputation) train
    exactly what plain layers train, through DeepSpeed ZeRO-3 on 2 ranks: losses, gradient norms, export."""
    for name, extra in (("plain", []), ("checkpointed", ["stage.activation_checkpointing=true"])):
        run_train(root, "stage=sparse", f"run.name=ac_{name}", "stage.steps=2", "deepspeed=zero3", "stage.lr=1e-3",
                  f"stage.init_from={root}/ckpt/base/base/export", *extra, nproc=2)
    plain, ckpt = metrics(root, "ac_plain", "sparse"), metrics(root, "ac_checkpointed", "sparse")
    for a, b in zip(plain, ckpt, strict=True):
        for key in ("loss/lm", "loss/indexer_kl", "train/grad_norm"):
            assert _close(a[key], b[key], 1e-5), (key, a, b)
    w0 = load_file(root / "ckpt/ac_plain/sparse/export/model.safetensors")
    w1 = load_file(root / "ckpt/ac_checkpointed/sparse/export/model.safetensors")
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) <= 1e-6


def test_cpu_offload_of_optimizer_state_matches(root):
    run_train(root, "stage=warmup", "run.name=offload", "stage.steps=2", "deepspeed=zero3_offload")
    run_train(root, "stage=warmup", "run.name=nooffload", "stage.steps=2", "deepspeed=zero3")
    for a, b in zip(metrics(root, "offload", "warmup"), metrics(root, "nooffload", "warmup"), strict=True):
        assert _close(a["loss/indexer_kl"], b["loss/indexer_kl"]) and _close(a["train/grad_norm"], b["train/grad_norm"])


def test_sigkill_then_relaunch_is_bit_identical(root):
    args = ("stage=warmup", "stage.steps=8", "stage.save_every=1", "stage.log_every=1")
    run_train(root, *args, "run.name=straight")
    kill_after = random.Random(os.getpid()).randint(2, 6)
    cmd = [sys.executable, "-m", "train", *tiny_overrides(root), *args, "run.name=killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = root / "ckpt/killed/warmup/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < kill_after):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run_train(root, *args, "run.name=killed")
    assert "[resume]" in out.stdout
    straight, killed = metrics(root, "straight", "warmup"), metrics(root, "killed", "warmup")
    assert _stable(killed) == _stable(straight), f"killed after {kill_after} logged steps"
    assert killed[-1]["tokens/total"] == 8 * 4 * 128


def test_half_written_checkpoint_is_never_resumed(root):
    args = ("stage=warmup", "stage.steps=4", "stage.save_every=2", "stage.keep_last=1")
    run_train(root, *args, "run.name=straight4")
    run_train(root, "stage=warmup", "stage.steps=2", "stage.save_every=2", "run.name=partial")
    ckpt = root / "ckpt/partial/warmup/ckpt"
    # A save of step 3 killed midway: its directory exists with a truncated file, `latest` was not moved.
    (ckpt / "step3").mkdir()
    (ckpt / "step3" / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02trunc")
    out = run_train(root, *args, "run.name=partial")
    assert "at step 2" in out.stdout
    assert _stable(metrics(root, "partial", "warmup")) == _stable(metrics(root, "straight4", "warmup"))
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step4"], "keep_last=1 rotates older checkpoints"


def test_resume_with_another_rank_count_stops_with_a_message(root):
    run_train(root, "stage=warmup", "run.name=ranks", "stage.steps=1")
    out = run_train(root, "stage=warmup", "run.name=ranks", "stage.steps=2", nproc=2, check=False)
    assert out.returncode != 0
    assert "saved with 1 ranks, resumed with 2; relaunch with the same number of ranks" in out.stderr, out.stderr[-3000:]

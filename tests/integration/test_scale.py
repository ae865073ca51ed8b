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


def test_zero3_warmup_and_sparse(root):
    run_train(root, "stage=warmup", "run.name=z3", "stage.steps=2", "deepspeed=zero3", nproc=2)
    run_train(root, "stage=sparse", "run.name=z3", "stage.steps=2", "deepspeed=zero3", "stage.lr=1e-3", nproc=2)
    run_train(root, "stage=warmup", "run.name=z1", "stage.steps=2", "deepspeed=zero1", nproc=2)
    z3, z1 = metrics(root, "z3", "warmup"), metrics(root, "z1", "warmup")
    for a, b in zip(z3, z1, strict=True):
        assert abs(a["loss/indexer_kl"] - b["loss/indexer_kl"]) <= 1e-5
    base = load_file(root / "ckpt/base/base/export/model.safetensors")
    warm = load_file(root / "ckpt/z3/warmup/export/model.safetensors")
    assert all(torch.equal(warm[k], v) for k, v in base.items()), "ZeRO-3 export: backbone unchanged"
    assert metrics(root, "z3", "sparse")[-1]["loss/lm"] > 0


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

"""One job per run directory, and starting over without losing the old run (real runs, CPU/gloo)."""

import fcntl
import json

import pytest

from tests.integration.helpers import metrics, run_train


def test_a_second_job_on_a_live_run_directory_stops_with_one_line(tmp_path):
    lock_file = tmp_path / "ckpt" / "one" / ".base.lock"
    lock_file.parent.mkdir(parents=True)
    with open(lock_file, "a+") as held:  # a live holder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7, since 2026-12-03 09:00:00\n")
        held.flush()
        out = run_train(tmp_path, "stage=base", "run.name=one", "stage.steps=2", check=False)
        assert out.returncode == 2
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "in use by pid 4242 on node7" in lines[0], out.stderr[-2000:]
        assert not (tmp_path / "ckpt" / "one" / "base").exists(), "nothing is written before the lock"
    # the holder is gone (its lock file stays): the next launch takes the directory
    run_train(tmp_path, "stage=base", "run.name=one", "stage.steps=2")
    assert [m["step"] for m in metrics(tmp_path, "one", "base")] == [1, 2]


def test_starting_over_sets_the_old_run_aside(tmp_path):
    run_train(tmp_path, "stage=base", "run.name=r", "stage.steps=4", "stage.save_every=2")
    out = run_train(tmp_path, "stage=base", "run.name=r", "stage.steps=2", "stage.save_every=1",
                    "run.resume=false")
    assert "was set aside as" in out.stdout
    stage = tmp_path / "ckpt" / "r" / "base"
    old = [p for p in stage.parent.iterdir() if p.name.startswith("base.old-")]
    assert len(old) == 1 and (old[0] / "ckpt" / "step4").is_dir()  # the old run is kept whole
    latest = (stage / "ckpt" / "latest").read_text().strip()
    assert latest == "step2" and (stage / "ckpt" / latest).is_dir()
    assert [m["step"] for m in metrics(tmp_path, "r", "base")] == [1, 2]
    # and the new run resumes from its own checkpoint
    run_train(tmp_path, "stage=base", "run.name=r", "stage.steps=3")
    rows = metrics(tmp_path, "r", "base")
    assert [m["step"] for m in rows] == [1, 2, 3] and json.loads(json.dumps(rows[-1]))["tokens/total"] > 0


def test_ranks_die_with_their_launcher(tmp_path):
    """kill -9 of torchrun's agent: its ranks end too, instead of training on as orphans."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.integration.helpers import ROOT, tiny_overrides

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *tiny_overrides(tmp_path), "stage=base", "run.name=orphan", "stage.steps=100000"]
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        rows = tmp_path / "ckpt" / "orphan" / "base" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (rows.exists() and rows.read_text()) and time.time() < deadline:
            time.sleep(0.5)
        ranks = psutil.Process(agent.pid).children(recursive=True)
        assert rows.exists() and len(ranks) >= 2
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, [p.pid for p in alive]
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            p.kill()


def test_a_resume_that_changes_what_a_step_means_is_refused(tmp_path):
    run_train(tmp_path, "stage=base", "run.name=c", "stage.steps=2")
    out = run_train(tmp_path, "stage=base", "run.name=c", "stage.steps=3", "data.seq_len=64",
                    "stage.global_batch=8", check=False)
    assert out.returncode == 2
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "data.seq_len: 128 -> 64" in error[0] and "stage.global_batch: 4 -> 8" in error[0]
    assert [m["step"] for m in metrics(tmp_path, "c", "base")] == [1, 2]
    # extending stage.steps is a resume like any other, and every launch's config is kept
    run_train(tmp_path, "stage=base", "run.name=c", "stage.steps=3")
    assert [m["step"] for m in metrics(tmp_path, "c", "base")] == [1, 2, 3]
    assert len(list((tmp_path / "ckpt" / "c" / "base" / "configs").glob("*.yaml"))) == 2


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """The newest checkpoint made unreadable (a file truncated), then a relaunch: the run resumes from the one
    before with a line saying so, and its metrics equal an uninterrupted run's. A deleted `latest` resumes from
    the newest checkpoint that verifies, never from zero."""
    run_train(tmp_path, "stage=base", "run.name=full", "stage.steps=6")
    want = metrics(tmp_path, "full", "base")
    run_train(tmp_path, "stage=base", "run.name=cut", "stage.steps=4", "stage.save_every=2", "stage.keep_last=3")
    ckpt = tmp_path / "ckpt" / "cut" / "base" / "ckpt"
    victim = max((ckpt / "step4").rglob("*.pt"), key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = run_train(tmp_path, "stage=base", "run.name=cut", "stage.steps=6", "stage.save_every=2",
                    "stage.keep_last=3")
    assert "[resume] skipped:" in out.stdout and "step4" in out.stdout and "bytes" in out.stdout
    assert "[resume]" in out.stdout and "at step 2" in out.stdout
    got = metrics(tmp_path, "cut", "base")
    drop = ("time", "perf/tokens_per_sec", "mem/peak_gib")
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == [
        {k: v for k, v in r.items() if k not in drop} for r in want]
    (ckpt / "latest").unlink()
    out = run_train(tmp_path, "stage=base", "run.name=cut", "stage.steps=7", "stage.save_every=2",
                    "stage.keep_last=3")
    assert "latest is missing" in out.stdout and "at step 6" in out.stdout


@pytest.mark.slow  # CI keeps the lock's refusal of a second job (the first test here)
def test_make_warmup_twice_at_once(tmp_path):
    """Two `make warmup` on one run name at the same time: the second exits 2 with one line naming the holder;
    the first finishes normally, with exactly one metrics row per logged step."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.integration.helpers import ROOT, tiny_overrides

    run_train(tmp_path, "stage=base", "run.name=src", "stage.steps=2")
    venv = Path(sys.executable).parents[1]
    cmd = ["make", "-s", "-o", f"{venv}/.installed", "warmup", f"VENV={venv}", *tiny_overrides(tmp_path),
           f"model.path={tmp_path}/ckpt/src/base/export", "run.name=twice", "stage.steps=300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rows = tmp_path / "ckpt" / "twice" / "warmup" / "metrics.jsonl"
        deadline = time.time() + 300
        while not (rows.exists() and rows.read_text()) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first job was still running when the second ended"
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert "[done]" in out
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "in use by pid" in errors[0], second.stderr[-2000:]
    assert [m["step"] for m in metrics(tmp_path, "twice", "warmup")] == list(range(1, 301))


def test_a_run_removes_temporaries_that_killed_runs_left(tmp_path):
    """A kill during an export leaves `.export.tmp-PID`, one during tokenisation `.<entry>.tmp-PID`: the next run
    of the same kind removes those of dead processes, and keeps a live writer's."""
    import os
    import shutil
    import subprocess

    run_train(tmp_path, "stage=base", "run.name=t", "stage.steps=2")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stage = tmp_path / "ckpt" / "t" / "base"
    entry = next(p for p in (tmp_path / "token_cache").iterdir() if not p.name.startswith("."))
    shutil.rmtree(entry)  # as if its tokenisation had been killed
    stale = [stage / f".export.tmp-{dead.pid}", entry.with_name(f".{entry.name}.tmp-{dead.pid}")]
    live = stage / f".export.tmp-{os.getpid()}"
    for d in (*stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    run_train(tmp_path, "stage=base", "run.name=t", "stage.steps=3")
    assert not any(d.exists() for d in stale) and live.exists()
    assert (stage / "export" / "model.safetensors").stat().st_size > 100 and entry.is_dir()


def test_each_stage_draws_its_curves_and_make_report_draws_runs_together(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from tests.integration.helpers import ROOT

    out = run_train(tmp_path, "stage=base", "run.name=a", "stage.steps=3")
    png = tmp_path / "ckpt" / "a" / "base" / "report.png"
    assert f"[report] wrote {png}" in out.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_train(tmp_path, "stage=warmup", "run.name=b", f"model.path={tmp_path}/ckpt/a/base/export", "stage.steps=3")
    venv = Path(sys.executable).parents[1]
    both = subprocess.run(["make", "-s", "-o", f"{venv}/.installed", "report", f"VENV={venv}",
                           f"RUN={tmp_path}/ckpt/a {tmp_path}/ckpt/b", f"ARGS=--out {tmp_path}/both.png"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert both.returncode == 0, both.stderr[-2000:]
    assert f"[report] wrote {tmp_path}/both.png" in both.stdout and (tmp_path / "both.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: {tmp_path}: no metrics.jsonl")

"""A stage's run directory, `<run.root>/<run.name>/<stage>/`: where its files live, one job at a time on it, the
previous run set aside on a fresh start, and every launch's config kept (and checked on resume).

Layout: `ckpt/` (checkpoints, train/checkpoint.py), `config.yaml` (the latest launch's) and `configs/` (every
launch's), `metrics.jsonl` and `report.png` (train/metrics.py, train/report.py), `export/` (the model, at the end);
beside it, `.<stage>.lock`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from train import engine as eng


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, root: str, name: str, stage: str) -> "RunDir":
        return cls(Path(root) / name / stage)

    @property
    def ckpt(self) -> Path:
        return self.path / "ckpt"

    @property
    def export(self) -> Path:
        return self.path / "export"

    def claim(self):
        """Rank 0 locks the directory (one job per directory); every rank stops with its message if it cannot.
        Returns the lock (hold it until the process ends)."""
        lock, error = None, ""
        if eng.is_rank0():
            try:
                lock = _lock(self.path)
            except ValueError as e:
                error = str(e)
        if eng.all_reduce_sum(torch.tensor([float(bool(error))], device=eng.device())).item():
            raise ValueError(error or f"{self.path} is in use by another job (see rank 0)")
        return lock

    def start(self, resume: bool, allow_config_change: bool, config: dict, has_checkpoint: bool) -> None:
        """Before a stage builds anything: without `resume`, the previous run is set aside (rank 0); with it and a
        checkpoint to resume, the settings that define a step must match the saved config.yaml."""
        if not resume and eng.is_rank0():
            old = set_aside(self.path)
            if old is not None:
                eng.print0(f"[start] run.resume=false: the previous run in {self.path} was set aside as {old}")
        saved = self.path / "config.yaml"
        if resume and has_checkpoint and saved.is_file():
            changes = config_changes(OmegaConf.to_container(OmegaConf.load(saved), resolve=True), config)
            if changes and not allow_config_change:
                raise ValueError(f"resuming {self.path}, but settings that change what a step means differ from its "
                                 f"config.yaml: {'; '.join(changes)}; relaunch with the saved values, start over "
                                 "with run.resume=false (the old run is set aside), or set "
                                 "run.allow_config_change=true")

    def keep_config(self, raw_cfg, step: int) -> None:
        """Rank 0 keeps this launch's config: `configs/<time>-step<N>.yaml`, and `config.yaml` as the latest."""
        if not eng.is_rank0():
            return
        (self.path / "configs").mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(raw_cfg, resolve=True)
        (self.path / "configs" / f"{time.strftime('%Y%m%d-%H%M%S')}-step{step}.yaml").write_text(text)
        (self.path / "config.yaml").write_text(text)


def _lock(run_dir: Path):
    """Rank 0's exclusive lock on a stage's run directory, taken before anything is written there: a file
    `.<stage>.lock` beside it under an flock, which the OS releases when the process ends, however it ends (a
    lock left by a dead job is free). Returns the open file (hold it until exit); raises ValueError naming the
    holder when another live job has it."""
    import fcntl
    import socket

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    f = open(run_dir.parent / f".{run_dir.name}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{run_dir} is in use by {holder}; wait for that job to end (or stop it), or choose "
                         "another run.name") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def set_aside(run_dir: Path) -> Path | None:
    """`run.resume=false` over an existing run: the old stage directory is renamed `<stage>.old-<time>` (nothing
    is deleted, and its checkpoints can no longer mix with the new run's). Returns the new name, or None."""

    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    old = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(run_dir, old)
    return old


# Settings that change what a step means: a resumed run must keep them (`run.allow_config_change=true` overrides).
RUN_DEFINING = ("stage.name", "model", "data.sources", "data.seq_len", "data.tokenizer", "stage.global_batch",
                "stage.init_from")


def config_changes(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for each RUN_DEFINING setting that differs between two resolved configs."""
    def get(cfg, dotted):
        for part in dotted.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        return cfg
    return [f"{k}: {get(saved, k)!r} -> {get(now, k)!r}" for k in RUN_DEFINING if get(saved, k) != get(now, k)]

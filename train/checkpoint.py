"""Save and resume a stage exactly: DeepSpeed engine state plus the train state (step, tokens, data, RNG).

Protocol (a kill at any moment leaves a loadable checkpoint): every rank writes tag `step<N>` with
`save_latest=False`; after a barrier rank 0 checks that each rank's files are there and non-empty, then
replaces `latest` atomically (write a temporary file, rename). A half-written tag is never named by `latest`,
so resume takes the previous one; tags beyond `keep_last` are deleted only after `latest` moved.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from train import engine as eng

LATEST = "latest"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in ckpt_dir.glob("step*"):
        m = re.fullmatch(r"step(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _verify(tag_dir: Path, world_size: int) -> None:
    files = [f for f in tag_dir.glob("*.pt")]
    if not files or any(f.stat().st_size == 0 for f in files):
        raise RuntimeError(f"checkpoint {tag_dir} is incomplete: {len(files)} files, some empty or none")
    optim = list(tag_dir.glob("*optim_states.pt"))
    if optim and len(optim) < world_size:
        raise RuntimeError(f"checkpoint {tag_dir} has optimizer shards of {len(optim)} ranks, expected {world_size}")


def save(engine, ckpt_dir: Path, step: int, train_state: dict, keep_last: int, world_size: int) -> None:
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": train_state, "rng": rng_state()},
                           save_latest=False)
    eng.barrier()
    if eng.is_rank0():
        _verify(ckpt_dir / tag, world_size)
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        for _, old in _tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    eng.barrier()


def resume(engine, ckpt_dir: Path, world_size: int) -> dict | None:
    """Loads the checkpoint named by `latest` into the engine; returns its train state (None: fresh start).

    A checkpoint saved by another number of ranks stops with a ValueError, before DeepSpeed reads it where
    the optimizer is partitioned (ZeRO: one shard per rank), else from the saved train state."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    _check_world_size(ckpt_dir, len(list((ckpt_dir / tag).glob("*optim_states.pt"))) or world_size, world_size)
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"{latest} names checkpoint {tag!r}, which cannot be loaded")
    _check_world_size(ckpt_dir, client["train_state"]["world_size"], world_size)  # stage 0: no optimizer shards
    set_rng_state(client["rng"])
    return client["train_state"]


def _check_world_size(ckpt_dir: Path, saved: int, world_size: int) -> None:
    if saved != world_size:
        raise ValueError(f"{ckpt_dir}: saved with {saved} ranks, resumed with {world_size}; relaunch with the "
                         "same number of ranks (or run.resume=false to start over)")

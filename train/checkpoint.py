"""Save and resume a stage exactly: DeepSpeed engine state plus the train state (step, tokens, data, RNG)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


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


def save(engine, ckpt_dir: Path, step: int, train_state: dict) -> None:
    """Writes checkpoint `step{step}`; DeepSpeed moves the `latest` pointer only after all files are written."""
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"train_state": train_state,
                                                                            "rng": rng_state()})


def resume(engine, ckpt_dir: Path) -> dict | None:
    """Loads the latest checkpoint under ckpt_dir into the engine; returns its train state (None: fresh start)."""
    if not (ckpt_dir / "latest").is_file():
        return None
    load_path, client = engine.load_checkpoint(str(ckpt_dir))
    if load_path is None:
        raise RuntimeError(f"{ckpt_dir}/latest names a checkpoint that cannot be loaded")
    set_rng_state(client["rng"])
    return client["train_state"]

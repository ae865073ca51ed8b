"""Save and resume a stage exactly: DeepSpeed engine state plus the `TrainState` (step, tokens, data, RNG).

Protocol (a kill at any moment leaves a loadable checkpoint): every rank writes tag `step<N>` with
`save_latest=False`; after a barrier rank 0 checks that each rank's files are there and non-empty, writes their
sizes and CRC-32s (`checksums.json`), then replaces `latest` atomically (write a temporary file, rename). A
half-written tag is never named by `latest`; resume takes the newest checkpoint whose files match their
checksums, saying which it skipped; tags beyond `keep_last` are deleted only after `latest` moved.
"""

from __future__ import annotations

import os
import random
import json
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train import engine as eng

LATEST = "latest"


@dataclass
class TrainState:
    """Everything beyond the engine's weights and optimizer that a stage needs to continue exactly: what the loop
    counts, the data position (`data`: the pipeline, saved through its own state_dict) and the probe batch."""

    stage: str
    world_size: int
    data: Any                                  # has state_dict() / load_state_dict() (the TokenPipeline)
    step: int = 0
    tokens_total: int = 0                      # all ranks, every step counted once
    skipped: int = 0                           # updates skipped for non-finite values (stage.on_nonfinite=skip)
    skipped_in_row: int = 0
    probe_ids: torch.Tensor | None = None      # a fixed micro-batch for the selection-overlap and recall probes
    probe_topk: list[torch.Tensor] = field(default_factory=list)  # its selections at the last probe

    def state_dict(self) -> dict:
        return {"stage": self.stage, "world_size": self.world_size, "data": self.data.state_dict(),
                "step": self.step, "tokens_total": self.tokens_total, "skipped": self.skipped,
                "skipped_in_row": self.skipped_in_row,
                "probe_ids": None if self.probe_ids is None else self.probe_ids.cpu(),
                "probe_topk": [t.cpu() for t in self.probe_topk]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if state["stage"] != self.stage:
            raise ValueError(f"the checkpoint belongs to stage {state['stage']!r}, not {self.stage!r}")
        self.world_size, self.step, self.tokens_total = state["world_size"], state["step"], state["tokens_total"]
        self.skipped, self.skipped_in_row = state["skipped"], state["skipped_in_row"]
        self.data.load_state_dict(state["data"])
        self.probe_ids = None if state["probe_ids"] is None else state["probe_ids"].to(device)
        self.probe_topk = [t.to(device) for t in state["probe_topk"]]


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


CHECKSUMS = "checksums.json"
NO_CHECKSUMS = f"no {CHECKSUMS} (an interrupted save)"


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_checksums(tag_dir: Path) -> None:
    """Size and CRC-32 of every file of a checkpoint, beside it (read back once when saved)."""
    files = sorted(f for f in tag_dir.rglob("*") if f.is_file() and f.name != CHECKSUMS)
    sums = {str(f.relative_to(tag_dir)): {"bytes": f.stat().st_size, "crc32": _crc32(f)} for f in files}
    tmp = tag_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(sums, indent=1))
    os.replace(tmp, tag_dir / CHECKSUMS)


def verify_checksums(tag_dir: Path) -> str | None:
    """Why the checkpoint `tag_dir` cannot be trusted (a missing, truncated or altered file, no checksums), or
    None when every file matches what was written."""
    if not tag_dir.is_dir():
        return "no such directory"
    listing = tag_dir / CHECKSUMS
    if not listing.is_file():
        return NO_CHECKSUMS
    try:
        sums = json.loads(listing.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{CHECKSUMS} is unreadable"
    for name, want in sums.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size:,} bytes, {want['bytes']:,} when written"
        if _crc32(f) != want["crc32"]:
            return f"{name} does not match its checksum"
    return None


def save(engine, ckpt_dir: Path, state: TrainState, keep_last: int) -> None:
    tag, world_size = f"step{state.step}", state.world_size
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": state.state_dict(),
                                                                 "rng": rng_state()}, save_latest=False)
    eng.barrier()
    if eng.is_rank0():
        _verify(ckpt_dir / tag, world_size)
        write_checksums(ckpt_dir / tag)
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        for _, old in _tags(ckpt_dir)[:-keep_last]:
            if old.name != tag:  # never the checkpoint `latest` now names
                shutil.rmtree(old, ignore_errors=True)
    eng.barrier()


def choose(ckpt_dir: Path) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from: the one `latest` names if it verifies, else the newest that does (a
    deleted or bogus `latest`, a truncated or altered file). Returns (tag or None, a line per one skipped).
    Raises ValueError when checkpoints exist but none verifies: a run never silently restarts from zero."""
    latest = ckpt_dir / LATEST
    named = latest.read_text().strip() if latest.is_file() else None
    tags = [p.name for _, p in reversed(_tags(ckpt_dir))]
    candidates = ([named] if named else []) + [t for t in tags if t != named]
    skipped = []
    if named is None and tags:
        skipped.append(f"{latest} is missing")
    for tag in candidates:
        why = verify_checksums(ckpt_dir / tag)
        if why is None or (why == NO_CHECKSUMS and tag == named):
            return tag, skipped  # `latest` moves only after a complete save: one written before checksums is good
        skipped.append(f"{ckpt_dir / tag}: {why}")
    if tags:
        raise ValueError(f"no checkpoint in {ckpt_dir} can be resumed from ({'; '.join(skipped)}); move the "
                         "directory away, or start over with run.resume=false (the old run is set aside)")
    return None, skipped


def resume(engine, ckpt_dir: Path, state: TrainState) -> bool:
    """Loads the newest checkpoint that verifies (`choose`, on rank 0; every rank loads the same) into the engine
    and `state`, and says which were skipped and why; False: none there (a fresh start).

    A checkpoint saved by another number of ranks stops with a ValueError, before DeepSpeed reads it where
    the optimizer is partitioned (ZeRO: one shard per rank), else from the saved train state."""
    latest, world_size = ckpt_dir / LATEST, state.world_size
    step, error = -1, ""
    if eng.is_rank0():
        try:
            tag, skipped = choose(ckpt_dir)
            step = -1 if tag is None else int(tag.removeprefix("step"))
            for line in skipped:
                eng.print0(f"[resume] skipped: {line}")
        except ValueError as e:
            error, step = str(e), -2
    mine = float(step + 2) if eng.is_rank0() else 0.0  # rank 0's choice, shared with every rank
    shared = int(eng.all_reduce_sum(torch.tensor([mine], device=eng.device())).item()) - 2
    if shared == -2:
        raise ValueError(error or f"no checkpoint in {ckpt_dir} can be resumed from (see rank 0)")
    if shared == -1:
        return False
    tag = f"step{shared}"
    _check_world_size(ckpt_dir, len(list((ckpt_dir / tag).glob("*optim_states.pt"))) or world_size, world_size)
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"{latest} names checkpoint {tag!r}, which cannot be loaded")
    _check_world_size(ckpt_dir, client["train_state"]["world_size"], world_size)  # stage 0: no optimizer shards
    set_rng_state(client["rng"])
    state.load_state_dict(client["train_state"], engine.device)
    return True


def _check_world_size(ckpt_dir: Path, saved: int, world_size: int) -> None:
    if saved != world_size:
        raise ValueError(f"{ckpt_dir}: saved with {saved} ranks, resumed with {world_size}; relaunch with the "
                         "same number of ranks (or run.resume=false to start over)")

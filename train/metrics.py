"""One metrics logger (rank 0): always a local metrics.jsonl, optionally wandb (offline by default)."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

WANDB_MODES = ("offline", "online", "disabled")

# Every metric's name (the keys of metrics.jsonl and wandb), defined here only.
LM_LOSS, INDEXER_KL, TOTAL_LOSS = "loss/lm", "loss/indexer_kl", "loss/total"
RECALL, OVERLAP = "indexer/recall", "indexer/selection_overlap"
PER_LAYER = "_per_layer/"  # a metric's per-layer curves: e.g. indexer/recall_per_layer/3
LAYER_KL = "indexer/kl"  # the indexer KL's per-layer curves are named from this: indexer/kl_per_layer/<i>
LR, GRAD_NORM, SKIPPED_STEPS, EPOCH = "lr", "train/grad_norm", "train/skipped_steps", "data/epoch"
TOKENS_STEP, TOKENS_TOTAL = "tokens/step", "tokens/total"
TOKENS_PER_SEC, PEAK_MEMORY = "perf/tokens_per_sec", "mem/peak_gib"
EVAL = "eval/"  # held-out figures: EVAL + a key of `train.evaluation.summarize`
EVAL_DENSE_LM, EVAL_SPARSE_LM = EVAL + "dense_lm_loss", EVAL + "sparse_lm_loss"
EVAL_KL, EVAL_RECALL = EVAL + "indexer_kl", EVAL + "indexer_recall"
HEADLINE = (LM_LOSS, INDEXER_KL, RECALL)  # the progress line's and the summary's


def per_layer(name: str, layer: int) -> str:
    """The name of `name`'s curve for one layer."""
    return f"{name}{PER_LAYER}{layer}"


@dataclass
class WandbConfig:
    mode: str = "offline"         # offline: works without network; `wandb sync` uploads later
    project: str = "dsa-train"
    entity: str | None = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True         # one line per logging step on rank 0

    def validate(self) -> None:
        if self.wandb.mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb.mode={self.wandb.mode!r}; allowed: {', '.join(WANDB_MODES)}")
        if self.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ValueError(f"logging.wandb.mode={self.wandb.mode!r} needs the wandb package, which this Python "
                             "does not have; allowed: install it (`pip install wandb`, part of `make setup`), or "
                             "logging.wandb.mode=disabled (metrics.jsonl is written either way)")


def peak_memory_gib() -> float:
    """Peak accelerator memory of this process, or peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict, enabled: bool,
                 total_steps: int = 0):
        self.enabled, self.cfg, self.total_steps = enabled, cfg, total_steps
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_name,
                                     mode=cfg.wandb.mode, dir=str(run_dir), config=config, resume="allow",
                                     id=f"{run_name}".replace("/", "-"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, which the resumed run logs again."""
        if not (self.enabled and self.path.exists()):
            return
        rows = self.path.read_text().splitlines()
        kept = [r for r in rows if json.loads(r)["step"] <= step]
        if len(kept) != len(rows):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(r + "\n" for r in kept))
            tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        if not (self.enabled and self.cfg.progress):
            return
        shown = "  ".join(f"{k.split('/')[-1]} {metrics[k]:.4f}" for k in HEADLINE if k in metrics)
        print(f"step {step}/{self.total_steps}  {shown}  tokens {int(metrics[TOKENS_TOTAL]):,}  "
              f"{metrics[TOKENS_PER_SEC]:,.0f} tok/s", flush=True)

    def summary(self, stage: str, tokens: int, seconds: float) -> str:
        """One line for the end of a stage: each headline metric's first and last logged value (this run
        directory's whole history, resumes included), and the tokens and time of this launch."""
        rows = [json.loads(r) for r in self.path.read_text().splitlines()] if self.enabled and self.path.exists() else []
        parts = [f"[summary] {stage}: {rows[-1]['step'] if rows else 0} steps, {tokens:,} tokens in "
                 f"{seconds / 60:.1f} min"]
        for key in (*HEADLINE, EVAL_DENSE_LM, EVAL_SPARSE_LM, EVAL_KL, EVAL_RECALL):
            values = [r[key] for r in rows if key in r]
            if values:
                parts.append(f"{key} {values[0]:.4f} -> {values[-1]:.4f}")
        return "; ".join(parts)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()

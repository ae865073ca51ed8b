"""The structured training config (what Hydra composes from conf/) and its validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from train.data import DataConfig
from train.engine import DeepSpeedConfig
from train.metrics import LoggingConfig
from train.model import ModelConfig
from train.stages import STAGES, StageConfig


@dataclass
class RunConfig:
    """Where a run lives and how it starts; defaults here only (conf/config.yaml does not repeat them)."""

    name: str = "default"          # run state lives in <root>/<name>/<stage>/
    root: str = "checkpoints"
    seed: int = 0
    dry_run: bool = False          # print the plan (tokens, steps, batch split) and stop; no model is built
    resume: bool = True            # continue from the stage's latest checkpoint when there is one
    allow_config_change: bool = False  # resume although model, data, seq_len or global batch changed
    plan_gpus: int | None = None   # dry run: plan for this many GPUs (null: the ranks of this launch)
    plan_gpu_memory_gb: float = 141.0  # dry run: the GPU memory the smallest fitting configuration is sought for


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preset: dict[str, Any] = field(default_factory=dict)  # conf/preset/*: its name and per-stage sizes

    def validate(self, world_size: int = 1) -> None:
        """Raises ValueError naming the key, the value and what is allowed; runs before any work."""
        s = self.stage
        if s.name not in STAGES:
            raise ValueError(f"stage.name={s.name!r}; allowed: {', '.join(STAGES)}")
        if s.steps <= 0:
            raise ValueError(f"stage.steps={s.steps}; must be > 0")
        if s.max_tokens is not None and s.max_tokens <= 0:
            raise ValueError(f"stage.max_tokens={s.max_tokens}; must be > 0 or null")
        if s.micro_batch <= 0:
            raise ValueError(f"stage.micro_batch={s.micro_batch}; must be > 0")
        cp = self.deepspeed.context_parallel
        if cp >= 1 and world_size % cp:
            raise ValueError(f"deepspeed.context_parallel={cp} does not divide the {world_size} ranks; allowed: a "
                             f"divisor of the world size ({', '.join(str(d) for d in _divisors(world_size))})")
        if cp > 1 and self.data.seq_len % (2 * cp):
            raise ValueError(f"deepspeed.context_parallel={cp}: data.seq_len={self.data.seq_len} must split into "
                             f"2 x {cp} equal chunks (zig-zag); allowed: data.seq_len a multiple of {2 * cp}")
        dp = self.data_parallel(world_size)
        if s.global_batch <= 0 or s.global_batch % (s.micro_batch * dp):
            ranks = f"{dp} data-parallel ranks" if cp > 1 else f"{world_size} ranks"
            raise ValueError(
                f"stage.global_batch={s.global_batch} does not divide into stage.micro_batch={s.micro_batch} x "
                f"{ranks} x gradient accumulation; allowed: a positive multiple of {s.micro_batch * dp}")
        if not (0 < s.lr < math.inf) or (s.indexer_lr is not None and not (0 < s.indexer_lr < math.inf)):
            raise ValueError(f"stage.lr={s.lr}, stage.indexer_lr={s.indexer_lr}; learning rates must be finite "
                             "and > 0")
        if s.log_every <= 0 or s.save_every <= 0 or s.keep_last <= 0:
            raise ValueError(f"stage.log_every={s.log_every}, stage.save_every={s.save_every}, "
                             f"stage.keep_last={s.keep_last}; must be > 0")
        if s.eval_every < 0 or s.eval_sequences <= 0:
            raise ValueError(f"stage.eval_every={s.eval_every}, stage.eval_sequences={s.eval_sequences}; allowed: "
                             "eval_every >= 0 (0: off), eval_sequences > 0")
        if s.eval_every and not self.data.held_out:
            raise ValueError(f"stage.eval_every={s.eval_every} needs held-out text: set data.held_out (a file, "
                             "folder or glob), or stage.eval_every=0")
        if s.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"stage.on_nonfinite={s.on_nonfinite!r}; allowed: stop, skip")
        if s.on_nonfinite == "skip" and self.deepspeed.zero_stage == 0:
            raise ValueError("stage.on_nonfinite='skip' with deepspeed.zero_stage=0: skipping relies on the ZeRO "
                             "optimizer discarding non-finite gradients; allowed: zero_stage 1, 2 or 3, or "
                             "stage.on_nonfinite=stop")
        if s.max_skipped_steps <= 0:
            raise ValueError(f"stage.max_skipped_steps={s.max_skipped_steps}; must be > 0")
        if s.name != "base" and self.model_path() is None and not (self.run.dry_run and self.model.arch):
            raise ValueError(f"stage {s.name!r} converts a checkpoint, but model.path is null and stage.init_from "
                             "is null; set model.path=/path/to/deepseek_v3_dir")
        self.model.validate()
        self.data.validate()
        self.deepspeed.validate()
        self.logging.validate()

    def check_source(self) -> dict:
        """The checks that need the config.json of the checkpoint the stage starts from (cheap: no weights).
        Raises ValueError naming the keys; returns that config."""
        from train.model.hf import source_config
        from train.model.surgery import index_config

        init = self.stage.init_from
        if init is not None and not Path(init).is_dir():
            before = {"sparse": " (run the warm-up first: make warmup with the same run.name)"}.get(self.stage.name, "")
            raise ValueError(f"stage.init_from={init!r}: no such directory{before}")
        path = self.model_path()
        source = source_config(path, self.model.arch)
        where = f"{path}/config.json" if path else "model.arch"
        max_pos = source.get("max_position_embeddings")
        if max_pos and self.data.seq_len > max_pos:
            raise ValueError(f"data.seq_len={self.data.seq_len} is longer than the model's max_position_embeddings="
                             f"{max_pos} ({where}); allowed: data.seq_len <= {max_pos}")
        k = index_config(source, self.model)["index_topk"]
        if self.stage.name == "sparse" and k >= self.data.seq_len:
            origin = "model.index_topk" if self.model.index_topk is not None else f"index_topk of {where}"
            raise ValueError(f"index_topk={k} ({origin}) is not below data.seq_len={self.data.seq_len}: every query "
                             "would keep every token and the sparse stage would train dense attention; allowed: "
                             f"model.index_topk < {self.data.seq_len}, or a longer data.seq_len")
        return source

    def model_path(self) -> str | None:
        """The checkpoint this stage starts from; base builds from model.arch unless stage.init_from is set."""
        if self.stage.name == "base":
            return self.stage.init_from
        return self.stage.init_from or self.model.path

    def data_parallel(self, world_size: int) -> int:
        """Ranks that read different sequences: the world over the context-parallel degree."""
        return max(1, world_size // max(1, self.deepspeed.context_parallel))

    def grad_accum(self, world_size: int) -> int:
        return self.stage.global_batch // (self.stage.micro_batch * self.data_parallel(world_size))

    def tokens_per_step(self) -> int:
        return self.stage.global_batch * self.data.seq_len


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def from_hydra(cfg: DictConfig) -> TrainConfig:
    """Typed config from Hydra's; unknown keys and wrong types raise OmegaConf errors naming the key."""
    name = cfg.stage.name  # checked first: presets look their sizes up by stage name
    if name not in STAGES:
        raise ValueError(f"stage.name={name!r}; allowed: {', '.join(STAGES)}")
    schema = OmegaConf.structured(TrainConfig)
    unknown = _unknown_keys(cfg, schema)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: no such key in the typed config (train/config.py); check the "
                         "spelling (`+key=` cannot add keys)")
    merged = OmegaConf.merge(schema, cfg)
    return OmegaConf.to_object(merged)


def check_additions(args: list[str]) -> None:
    """Refuses `+key=value` command-line additions before Hydra sees them, with one line naming the key: the typed
    config has every key (an unknown one is a typo; a known one is set without `+`). Free-form nodes
    (`model.arch`, `preset`) may take new keys. Hydra itself fails with a traceback on an addition under a node
    that is null (`+data.synthetic.x=1` with data=files)."""
    for arg in args:
        if not arg.startswith("+") or arg.startswith("++") or "=" not in arg:
            continue
        path = arg[1:].split("=", 1)[0].split(".")
        node = OmegaConf.structured(TrainConfig)
        for i, part in enumerate(path):
            kind = OmegaConf.get_type(node) or node._metadata.ref_type
            if not dataclasses.is_dataclass(kind):
                break  # a free-form dict: `+` may add to it
            if OmegaConf.get_type(node) is None:
                node = OmegaConf.structured(kind)
            if part not in node.keys():
                raise ValueError(f"{'.'.join(path[: i + 1])}: no such key in the typed config (train/config.py); "
                                 "check the spelling (`+key=` cannot add keys)")
            node = node._get_node(part)
            if not isinstance(node, DictConfig):
                if i == len(path) - 1:
                    raise ValueError(f"{'.'.join(path)}: the key exists; set it without `+` ({arg[1:]})")
                raise ValueError(f"{'.'.join(path[: i + 2])}: no such key in the typed config (train/config.py); "
                                 f"{'.'.join(path[: i + 1])} is a value")
        else:
            raise ValueError(f"{'.'.join(path)}: the key exists; set it without `+` ({arg[1:]})")


def _unknown_keys(node: DictConfig, schema: DictConfig, prefix: str = "") -> list[str]:
    """Keys of `node` that the typed schema lacks (`+key=` additions), in its dataclass-typed parts."""
    out = []
    for key in node:
        if key == "hydra":
            continue
        if key not in schema.keys():  # (`in` alone is False for a key whose value is still missing)
            out.append(prefix + str(key))
            continue
        child = schema._get_node(key)  # the node itself: reading a missing value (???) would raise
        if not isinstance(child, DictConfig):
            continue
        kind = OmegaConf.get_type(child) or child._metadata.ref_type  # an optional node set to null: its declared type
        value = node._get_node(key)
        if dataclasses.is_dataclass(kind) and isinstance(value, DictConfig) and not value._is_none():
            if OmegaConf.get_type(child) is None:  # null in the schema: compare with the dataclass's own fields
                child = OmegaConf.structured(kind)
            out += _unknown_keys(value, child, f"{prefix}{key}.")
    return out

"""Every config composes; invalid values stop before any work, naming the key, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from train.config import TrainConfig, from_hydra
from train.engine import build_ds_config, DeepSpeedConfig

CONF = str(Path(__file__).resolve().parents[2] / "conf")
ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _cfg(*overrides) -> TrainConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return from_hydra(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("stage", ["base", "warmup", "sparse"])
@pytest.mark.parametrize("preset", ["synthetic", "paper"])
@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_every_config_composes_and_validates(stage, preset, zero):
    cfg = _cfg(f"stage={stage}", f"preset={preset}", f"deepspeed={zero}")
    cfg.validate(world_size=1)
    assert cfg.stage.name == stage


def test_paper_preset_numbers():
    warm, sparse = _cfg("preset=paper", "stage=warmup"), _cfg("preset=paper", "stage=sparse")
    assert (warm.stage.steps, warm.stage.global_batch, warm.stage.lr, warm.data.seq_len) == (1000, 16, 1e-3, 131072)
    assert warm.tokens_per_step() * warm.stage.steps == 2_097_152_000
    assert (sparse.stage.steps, sparse.stage.global_batch, sparse.stage.lr) == (15000, 480, 7.3e-6)
    assert sparse.model.index_topk == 2048
    assert sparse.tokens_per_step() * sparse.stage.steps == 943_718_400_000
    assert sparse.stage.init_from == "checkpoints/default/warmup/export"


@pytest.mark.parametrize("overrides, needles", [
    (["stage.steps=0"], ["stage.steps=0", "> 0"]),
    (["stage.global_batch=10", "stage.micro_batch=4"], ["stage.global_batch=10", "stage.micro_batch=4",
                                                        "multiple of 4"]),
    (["stage.name=dense"], ["stage.name='dense'", "base, warmup, sparse"]),
    (["model.index_topk=0"], ["model.index_topk=0", ">= 1"]),
    (["model.path=null"], ["model.path is null"]),
    (["deepspeed.zero_stage=4"], ["deepspeed.zero_stage=4", "0, 1, 2, 3"]),
    (["logging.wandb.mode=cloud"], ["logging.wandb.mode='cloud'", "offline"]),
    (["stage.on_nonfinite=ignore"], ["stage.on_nonfinite='ignore'", "stop, skip"]),
    (["stage.on_nonfinite=skip", "deepspeed.zero_stage=0"], ["deepspeed.zero_stage=0", "zero_stage 1, 2 or 3"]),
    (["stage.max_skipped_steps=0"], ["stage.max_skipped_steps=0", "> 0"]),
])
def test_invalid_values_name_key_value_and_allowed(overrides, needles):
    with pytest.raises(ValueError) as e:
        _cfg(*overrides).validate(world_size=1)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_global_batch_must_divide_by_ranks():
    with pytest.raises(ValueError, match="multiple of 3"):
        _cfg("stage.global_batch=8").validate(world_size=3)


def test_cli_dry_run_of_paper_preset_prints_tokens():
    out = subprocess.run([sys.executable, "-m", "train", "preset=paper", "run.dry_run=true"], capture_output=True,
                         text=True, cwd=Path(CONF).parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tokens per step: 2,097,152" in out.stdout and "tokens in stage: 2,097,152,000" in out.stdout


def test_cli_error_is_one_clear_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "train", "stage.steps=-3"], capture_output=True, text=True,
                         cwd=Path(CONF).parent, timeout=120)
    assert out.returncode == 2
    assert "error: stage.steps=-3; must be > 0" in out.stderr and "Traceback" not in out.stderr


def test_ds_config_builder():
    ds = build_ds_config(DeepSpeedConfig(zero_stage=3, offload_optimizer=True), micro_batch=2, grad_accum=4,
                         world_size=8, lr=1e-3, weight_decay=0.0, grad_clip=1.0, bf16=True)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds["bf16"] == {"enabled": True}

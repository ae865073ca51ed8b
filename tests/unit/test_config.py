"""Every config composes; invalid values stop before any work, naming the key, the value and what is allowed."""

import os
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
    assert sparse.tokens_per_step() * sparse.stage.steps == 943_718_400_000
    assert sparse.stage.init_from == "checkpoints/default/warmup/export"


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_a_real_model_starts_from_the_paper_recipe_and_the_default_from_its_own(stage):
    real = _cfg("model=deepseek_v3", "model.path=/ckpt", f"stage={stage}")
    paper = _cfg("preset=paper", f"stage={stage}")
    assert real.preset["name"] == "paper"
    assert (real.stage.steps, real.stage.global_batch, real.stage.lr, real.data.seq_len) == (
        paper.stage.steps, paper.stage.global_batch, paper.stage.lr, paper.data.seq_len)
    assert real.model.index_topk is None and real.model.dtype is None  # the checkpoint's own
    default = _cfg(f"stage={stage}")
    assert default.preset["name"] == "synthetic" and default.data.seq_len == 512


def test_stage_files_hold_no_sizes():
    """Steps, batch and lr have one home, the presets: no stage file repeats them."""
    import yaml

    for f in (Path(CONF) / "stage").glob("*.yaml"):
        assert not {"steps", "global_batch", "lr"} & set(yaml.safe_load(f.read_text())), f


def test_indexer_defaults_scale_with_the_model():
    from train.model.surgery import ModelConfig, index_config

    v3 = dict(model_type="deepseek_v3", num_attention_heads=128, qk_nope_head_dim=128, qk_rope_head_dim=64)
    small = dict(model_type="deepseek_v3", num_attention_heads=4, qk_nope_head_dim=32, qk_rope_head_dim=16)
    assert index_config(v3, ModelConfig()) == {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    assert index_config(small, ModelConfig()) == {"index_n_heads": 2, "index_head_dim": 32, "index_topk": 2048}
    # GQA: half the query heads (at most 64) of the attention's own head dim (Qwen3-32B: 64 x 128, hidden 5120)
    qwen3_32b = dict(model_type="qwen3", num_attention_heads=64, num_key_value_heads=8, head_dim=128, hidden_size=5120)
    assert index_config(qwen3_32b, ModelConfig()) == {"index_n_heads": 32, "index_head_dim": 128, "index_topk": 2048}
    llama = dict(model_type="llama", num_attention_heads=16, num_key_value_heads=4, hidden_size=1024)
    assert index_config(llama, ModelConfig())["index_head_dim"] == 64
    # an export's own indexer wins over the defaults, and top-k may be overridden
    export = {**small, "index_n_heads": 3, "index_head_dim": 16, "index_topk": 64}
    assert index_config(export, ModelConfig()) == {"index_n_heads": 3, "index_head_dim": 16, "index_topk": 64}
    assert index_config(export, ModelConfig(index_topk=32))["index_topk"] == 32
    with pytest.raises(ValueError, match="model.index_n_heads=4 but the checkpoint's indexer has index_n_heads=3"):
        index_config(export, ModelConfig(index_n_heads=4))


@pytest.mark.parametrize("overrides, needles", [
    (["stage.steps=0"], ["stage.steps=0", "> 0"]),
    (["stage.global_batch=10", "stage.micro_batch=4"], ["stage.global_batch=10", "stage.micro_batch=4",
                                                        "multiple of 4"]),
    (["stage.name=dense"], ["stage.name='dense'", "base, warmup, sparse"]),
    (["model.index_topk=0"], ["model.index_topk=0", ">= 1"]),
    (["model.dtype=fp8"], ["model.dtype='fp8'", "float32, bfloat16, float16"]),
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


def test_wandb_logging_without_the_package_is_refused_before_any_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError) as e:
        _cfg("logging.wandb.mode=offline").validate(world_size=1)
    for n in ("logging.wandb.mode='offline'", "wandb package", "logging.wandb.mode=disabled"):
        assert n in str(e.value), str(e.value)
    _cfg("logging.wandb.mode=disabled").validate(world_size=1)


def _v3_dir(tmp_path, **config):
    import json

    from tests.conftest import TINY_ARCH

    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", **TINY_ARCH, **config}))
    return str(d)


@pytest.mark.parametrize("overrides, needles", [
    (["data.seq_len=2048"], ["data.seq_len=2048", "max_position_embeddings=1024", "config.json",
                             "data.seq_len <= 1024"]),
    (["stage=sparse", "data.seq_len=512", "stage.init_from=SRC"], [
        "index_topk=2048 (index_topk of", "data.seq_len=512", "model.index_topk < 512"]),
    (["stage=sparse", "data.seq_len=64", "model.index_topk=64", "stage.init_from=SRC"], [
        "index_topk=64 (model.index_topk)", "model.index_topk < 64"]),
    (["stage=sparse", "stage.init_from=/nowhere/warmup/export"], [
        "stage.init_from='/nowhere/warmup/export'", "run the warm-up first"]),
])
def test_checks_against_the_source_checkpoint(tmp_path, overrides, needles):
    src = _v3_dir(tmp_path, max_position_embeddings=1024)
    cfg = _cfg("model=deepseek_v3", f"model.path={src}", *[o.replace("SRC", src) for o in overrides])
    cfg.validate(world_size=1)
    with pytest.raises(ValueError) as e:
        cfg.check_source()
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


@pytest.mark.parametrize("args, needle", [
    (["stage.lr=nan"], "stage.lr=nan"),
    (["+stage.foo=1"], "stage.foo: no such key"),
    (["+data.foo=2"], "data.foo: no such key"),
    (["data=files", "data.sources.0.path=x", "+data.synthetic.foo=3"], "data.synthetic.foo: no such key"),  # null
])
def test_cli_bad_values_and_unknown_keys_are_one_line(args, needle):
    out = subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True,
                         cwd=Path(CONF).parent, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and needle in lines[-1] and "Traceback" not in out.stderr, lines


def test_launcher_rejects_a_bad_nproc():
    out = subprocess.run(["bash", "launch/local.sh", "stage=base"], capture_output=True, text=True,
                         cwd=Path(CONF).parent, timeout=60, env={**os.environ, "NPROC": "two"})
    assert out.returncode == 2 and "error: NPROC=two" in out.stderr
    # CPUs are counted whatever OMP_NUM_THREADS says (GNU nproc answers it; users set it to 1 for CPU ranks)
    out = subprocess.run(["bash", "launch/local.sh", "stage=base"], capture_output=True, text=True,
                         cwd=Path(CONF).parent, timeout=60,
                         env={**os.environ, "NPROC": "100000", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and "error: NPROC=100000" in out.stderr and "allowed 1.." in out.stderr
    if "no GPU" in out.stderr:
        assert f"no GPU and {len(os.sched_getaffinity(0))} CPU(s)" in out.stderr, out.stderr


def test_an_unwritable_or_full_output_directory_is_one_line(tmp_path):
    import errno

    from train.__main__ import _os_error

    (tmp_path / "afile").write_text("")
    for root, needle in ((tmp_path / "afile" / "ckpt", "a file stands where a directory is needed"),
                         ("/sys/ckpt", "point run.root")):  # /sys: not writable, even for root
        out = subprocess.run([sys.executable, "-m", "train", "stage=base", f"run.root={root}", "stage.steps=1",
                              "logging.wandb.mode=disabled"], capture_output=True, text=True, cwd=Path(CONF).parent,
                             timeout=120)
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert out.returncode == 2 and len(lines) == 1 and str(root) in lines[0] and needle in lines[0], out.stderr
        assert "Traceback" not in out.stderr
    full = _os_error(OSError(errno.ENOSPC, "No space left on device", "/ckpt/run/base/ckpt/step9"))
    assert full.startswith("/ckpt/run/base/ckpt/step9: No space left on device; the disk is full")


def test_additions_inside_the_optional_synthetic_node_are_unknown_keys():
    """The composed config's check (what runs after Hydra): a key added under data.synthetic is named."""
    with pytest.raises(ValueError, match=r"data\.synthetic\.foo: no such key"):
        _cfg("+data.synthetic.foo=1")


@pytest.mark.parametrize("arg, needle", [
    ("+data.synthetic.foo=3", "data.synthetic.foo: no such key"),
    ("+data.seq_len=5", "data.seq_len: the key exists; set it without `+` (data.seq_len=5)"),
    ("+data.seq_len.x=1", "data.seq_len.x: no such key in the typed config (train/config.py); data.seq_len is a value"),
    ("+deepspeed=zero2", "deepspeed: the key exists"),
])
def test_additions_are_refused_before_hydra(arg, needle):
    from train.config import check_additions

    with pytest.raises(ValueError) as e:
        check_additions(["stage=warmup", arg])
    assert needle in str(e.value)
    check_additions(["+model.arch.rope_scaling.factor=4", "++data.seq_len=5"])  # free-form nodes; forced sets

"""Bad checkpoint directories fail before anything is written, naming the file and the key."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from tests.conftest import TINY_INDEX
from train.export import main as export_main
from train.model import ModelConfig, build_model
from train.model.hf import CheckpointError


@pytest.fixture
def v3_dir(tiny_arch, tmp_path):
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(DeepseekV3Config(**tiny_arch)).save_pretrained(tmp_path / "v3")
    return tmp_path / "v3"


def _fails(path, *needles):
    with pytest.raises(CheckpointError) as e:
        build_model(ModelConfig(path=str(path), **TINY_INDEX))
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_valid_source_converts_and_cli_writes(v3_dir, tmp_path):
    assert export_main(["--source", str(v3_dir), "--out", str(tmp_path / "out"), "--index-n-heads", "4",
                        "--index-head-dim", "16", "--index-topk", "8", "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "deepseek_v32"


def test_not_a_directory_and_no_config(tmp_path):
    _fails(tmp_path / "nope", "model.path=", "not a directory")
    (tmp_path / "empty").mkdir()
    _fails(tmp_path / "empty", str(tmp_path / "empty" / "config.json"), "missing")


def test_wrong_model_type(v3_dir):
    cfg = json.loads((v3_dir / "config.json").read_text())
    (v3_dir / "config.json").write_text(json.dumps(cfg | {"model_type": "gemma3"}))
    _fails(v3_dir, "config.json", "'model_type'", "'gemma3'", "deepseek_v3", "deepseek_v2", "qwen3", "llama",
           "Sliding-window")
    # a supported family whose weights are another's: the first foreign key is named
    (v3_dir / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    _fails(v3_dir, "model.safetensors", "unexpected key", "kv_a_layernorm", "llama")


def test_sliding_window_sources_are_refused(v3_dir):
    cfg = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "sliding_window": 4096}
    (v3_dir / "config.json").write_text(json.dumps(cfg))
    _fails(v3_dir, "sliding-window", "'sliding_window' is 4096", "sliding_window null")
    (v3_dir / "config.json").write_text(json.dumps(cfg | {"model_type": "qwen2", "use_sliding_window": True}))
    _fails(v3_dir, "sliding-window", "use_sliding_window false")
    (v3_dir / "config.json").write_text(json.dumps(cfg | {"sliding_window": None, "num_key_value_heads": 3}))
    _fails(v3_dir, "'num_key_value_heads' is 3", "num_attention_heads=4")


def test_mismatched_shape_names_file_and_key(v3_dir):
    weights = v3_dir / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, weights, metadata={"format": "pt"})
    _fails(v3_dir, str(weights), key, "[3, 5]")


def test_missing_and_unexpected_keys(v3_dir, tmp_path):
    weights = v3_dir / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    del tensors[key]
    save_file(tensors, weights, metadata={"format": "pt"})
    _fails(v3_dir, key, "in no *.safetensors file")
    tensors[key] = torch.zeros(16, 64)
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    _fails(v3_dir, str(weights), "unexpected key 'model.layers.0.self_attn.surprise.weight'")


def test_cli_writes_nothing_on_error(v3_dir, tmp_path, capsys):
    cfg = json.loads((v3_dir / "config.json").read_text())
    (v3_dir / "config.json").write_text(json.dumps(cfg | {"q_lora_rank": None}))
    out = tmp_path / "out"
    assert export_main(["--source", str(v3_dir), "--out", str(out)]) == 2
    assert "unexpected key 'model.layers.0.self_attn.q_a_layernorm.weight'" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_truncated_file_and_missing_shard_are_named(tiny_arch, tmp_path):
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(DeepseekV3Config(**tiny_arch)).save_pretrained(tmp_path / "v3", max_shard_size="100KB")
    shard = sorted((tmp_path / "v3").glob("*.safetensors"))[1]
    data = shard.read_bytes()
    for cut in (1000, int(len(data) * 0.9)):  # inside the header, inside the tensors
        shard.write_bytes(data[:cut])
        _fails(tmp_path / "v3", str(shard), "not a readable safetensors file", "truncated")
    shard.unlink()
    _fails(tmp_path / "v3", "model.safetensors.index.json", f"names shard {shard.name}", "1 of ")

"""FP8 checkpoints: refused with the way out named; `train.dequantize` gives the bf16 copy the formula says."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from tests.conftest import TINY_INDEX, perturb_
from train.dequantize import DequantizeError, dequantize_checkpoint
from train.model import ModelConfig, build_model
from train.model.hf import CheckpointError, validate_checkpoint

BLOCK = (16, 16)  # small blocks: the tiny weights span several, some of them partial (40 rows = 16 + 16 + 8)


def _read_all(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _quantize(w):
    """Per-block absmax scaling to float8 e4m3 (max 448), the way DeepSeek's checkpoints are made."""
    R, C = w.shape
    nr, nc = -(-R // BLOCK[0]), -(-C // BLOCK[1])
    scale = torch.empty(nr, nc)
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * BLOCK[0] : (i + 1) * BLOCK[0], j * BLOCK[1] : (j + 1) * BLOCK[1]].float()
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448
            q[i * BLOCK[0] : (i + 1) * BLOCK[0], j * BLOCK[1] : (j + 1) * BLOCK[1]] = (blk / scale[i, j]).to(q.dtype)
    return q, scale


@pytest.fixture
def fp8_checkpoint(tiny_arch, tmp_path):
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**tiny_arch)).to(torch.bfloat16)
    perturb_(model, seed=4)
    model.save_pretrained(tmp_path / "bf16")
    state = _read_all(tmp_path / "bf16")
    shards, weight_map, quantized = [{}, {}], {}, []
    for i, (key, t) in enumerate(sorted(state.items())):
        if key.endswith("proj.weight") and t.dim() == 2:
            q, scale = _quantize(t)
            # scales land in the other shard than their weight: the tool must look them up by the index
            shards[i % 2][key], shards[1 - i % 2][key + "_scale_inv"] = q, scale
            weight_map[key], weight_map[key + "_scale_inv"] = f"s{i % 2}.safetensors", f"s{1 - i % 2}.safetensors"
            quantized.append(key)
        else:
            shards[i % 2][key] = t
            weight_map[key] = f"s{i % 2}.safetensors"
    src = tmp_path / "fp8"
    src.mkdir()
    for n, shard in enumerate(shards):
        save_file(shard, str(src / f"s{n}.safetensors"), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.json").write_text("{}")  # stands for the tokenizer files: copied as they are
    return src, state, quantized, tmp_path


def test_fp8_checkpoint_is_refused_with_the_tool_named(fp8_checkpoint):
    src, *_ = fp8_checkpoint
    with pytest.raises(CheckpointError, match="quantization_config.*make dequantize"):
        validate_checkpoint(src)


def test_dequantized_copy_equals_the_block_formula_and_loads(fp8_checkpoint, tiny_arch):
    src, original, quantized, tmp_path = fp8_checkpoint
    dst = dequantize_checkpoint(src, tmp_path / "out")
    got = _read_all(dst)
    fp8 = _read_all(src)
    assert sorted(got) == sorted(original) and len(quantized) > 10
    for key, t in got.items():
        if key not in quantized:
            assert torch.equal(t, original[key]), key
            continue
        q, scale = fp8[key], fp8[key + "_scale_inv"]
        want = torch.empty(q.shape)
        for i in range(scale.shape[0]):  # block by block, written out
            for j in range(scale.shape[1]):
                rows, cols = slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])
                want[rows, cols] = q[rows, cols].float() * scale[i, j]
        assert t.dtype == torch.bfloat16 and torch.equal(t, want.to(torch.bfloat16)), key
        err = (t.float() - original[key].float()).abs().max() / original[key].float().abs().max()
        assert err < 0.07, (key, err)  # e4m3 keeps 3 mantissa bits
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and (dst / "tokenizer.json").exists()
    validate_checkpoint(dst)
    model = build_model(ModelConfig(path=str(dst), **TINY_INDEX))
    assert torch.equal(model.layers[1].self_attn.kv_a_proj_with_mqa.weight, got[
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"])


def test_dequantize_errors_name_the_problem(fp8_checkpoint):
    src, _, _, tmp_path = fp8_checkpoint
    with pytest.raises(DequantizeError, match="exists"):
        dequantize_checkpoint(src, tmp_path / "bf16")
    with pytest.raises(DequantizeError, match="not quantised"):
        dequantize_checkpoint(tmp_path / "bf16", tmp_path / "new")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]  # the scales no longer fit the weights
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(DequantizeError, match="scale_inv of shape"):
        dequantize_checkpoint(src, tmp_path / "new")
    assert not any(p.name.startswith((".new", "new")) for p in tmp_path.iterdir())  # nothing half-written
    cli = subprocess.run([sys.executable, "-m", "train.dequantize", str(tmp_path / "bf16"), str(tmp_path / "new")],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and cli.stderr.startswith("error:") and "not quantised" in cli.stderr

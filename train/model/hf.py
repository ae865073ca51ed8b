"""Hugging Face checkpoints: the key table, validation of a checkpoint directory, and the DeepSeek-V3.2 export.

On disk, DeepSeek checkpoints keep one tensor per expert (`mlp.experts.{e}.gate_proj.weight`); transformers
fuses them in memory (`mlp.experts.gate_up_proj`). Our model uses the in-memory names; `disk_shapes`
maps between the two, and export goes through transformers' own `save_pretrained` so that the files are
what transformers, vLLM and SGLang read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32")

# The indexer's checkpoint keys under `model.layers.{i}.self_attn.indexer.` and their shapes (DSA.md §2).
INDEXER_KEYS = {
    "wq_b.weight": lambda c: (c["index_n_heads"] * c["index_head_dim"], c["q_lora_rank"]),
    "wk.weight": lambda c: (c["index_head_dim"], c["hidden_size"]),
    "k_norm.weight": lambda c: (c["index_head_dim"],),
    "k_norm.bias": lambda c: (c["index_head_dim"],),
    "weights_proj.weight": lambda c: (c["index_n_heads"], c["hidden_size"]),
}
INDEXER_PREFIX = "model.layers.{i}.self_attn.indexer."

# Source config keys that DeepseekV32Config derives itself or that do not describe the architecture.
_NOT_EXPORTED = {"architectures", "transformers_version", "head_dim", "mlp_layer_types", "layer_types", "dtype"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the file and the key."""


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a DeepSeek-V3(.2) checkpoint directory, checked for what DSA needs."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"model.path={str(path)!r}: not a directory (expected a Hugging Face checkpoint)")
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; model.path must be a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{cfg_file}: key 'model_type' is {model_type!r}; allowed: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(a DeepSeek-V3-architecture MLA checkpoint)"
        )
    if not config.get("q_lora_rank"):
        raise CheckpointError(
            f"{cfg_file}: key 'q_lora_rank' is {config.get('q_lora_rank')!r}; DSA's indexer reads MLA's query "
            "latent, so it must be a positive integer"
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise CheckpointError(
            f"{cfg_file}: key 'quantization_config' ({method}): the weights are quantised and training runs in "
            f"bf16; write a bf16 copy first (FP8: `make dequantize SRC={directory} DST=<new dir>`) and use that"
        )
    if model_type == "deepseek_v3" and config.get("rope_interleave", True) is not True:
        raise CheckpointError(
            f"{cfg_file}: key 'rope_interleave' is {config['rope_interleave']!r}; only the interleaved MLA RoPE "
            "layout (true) exports to deepseek_v32"
        )
    return config


def _meta_model(config: dict):
    """A transformers model of this config on the meta device (shapes only, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def disk_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds on disk, with its shape."""
    shapes = {}
    expert = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
    for name, tensor in _meta_model(config).state_dict().items():
        m = expert.match(name)
        if m is None:
            shapes[name] = tuple(tensor.shape)
            continue
        num_experts, rows, cols = tensor.shape
        for e in range(num_experts):
            if m.group(2) == "gate_up_proj":
                shapes[f"{m.group(1)}.{e}.gate_proj.weight"] = (rows // 2, cols)
                shapes[f"{m.group(1)}.{e}.up_proj.weight"] = (rows // 2, cols)
            else:
                shapes[f"{m.group(1)}.{e}.down_proj.weight"] = (rows, cols)
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def _is_extra_layer(key: str, num_layers: int) -> bool:
    """DeepSeek ships its multi-token-prediction module as layer `num_hidden_layers`; training ignores it."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return m is not None and int(m.group(1)) >= num_layers


def validate_checkpoint(path: str | os.PathLike) -> dict:
    """Checks config.json and every safetensors header against the architecture; returns the config.

    Raises CheckpointError naming the file and the key for a missing, unexpected or mis-shaped tensor.
    Reads headers only, so it is cheap even for a 671B checkpoint.
    """
    from safetensors import safe_open

    config = read_config(path)
    directory = Path(path)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weight files")
    expected = disk_shapes(config)
    seen = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if _is_extra_layer(key, config["num_hidden_layers"]):
                    continue
                if key not in expected:
                    raise CheckpointError(f"{file}: unexpected key {key!r} for a {config['model_type']} model "
                                          "of this config.json")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise CheckpointError(f"{file}: key {key!r} has shape {list(shape)}, config.json implies "
                                          f"{list(expected[key])}")
                seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{directory}: key {missing[0]!r} is in no *.safetensors file "
                              f"({len(missing)} missing in all)")
    return config


def v32_config(source_config: dict, index_n_heads: int, index_head_dim: int, index_topk: int):
    """The DeepseekV32Config of a converted model: the source architecture plus the DSA fields."""
    from transformers import DeepseekV32Config

    fields = {f.name for f in dataclasses.fields(DeepseekV32Config)} - _NOT_EXPORTED
    kwargs = {k: v for k, v in source_config.items() if k in fields}
    kwargs.update(index_n_heads=index_n_heads, index_head_dim=index_head_dim, index_topk=index_topk)
    config = DeepseekV32Config(**kwargs)
    config.architectures = ["DeepseekV32ForCausalLM"]
    return config


def export_hf(model, out_dir: str | os.PathLike, dtype: torch.dtype | None = None, tokenizer=None,
              dense_only: bool = False, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes `model` (a DSAForCausalLM) as a `deepseek_v32` Hugging Face directory, atomically.

    `dense_only` writes the backbone alone as `deepseek_v3` (a dense source, e.g. `make base`'s model).
    `state`: the weights to write (default: `model.state_dict()`; training passes the gathered CPU copy,
    since a ZeRO-3 model holds only its shards). The files (and the tokenizer, if given) appear under
    `out_dir` only once complete.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM

    state = model.state_dict() if state is None else state
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
             for k, v in state.items()}
    if dense_only:
        fields = {f.name for f in dataclasses.fields(DeepseekV3Config)} - _NOT_EXPORTED
        config = DeepseekV3Config(**{k: v for k, v in model.source_config.items() if k in fields})
        config.architectures = ["DeepseekV3ForCausalLM"]
        state = {k: v for k, v in state.items() if ".indexer." not in k}
        model_class = DeepseekV3ForCausalLM
    else:
        config = v32_config(model.source_config, model.index_n_heads, model.index_head_dim, model.index_topk)
        model_class = DeepseekV32ForCausalLM
    with torch.device("meta"):
        hf_model = model_class(config)
    result = hf_model.load_state_dict(state, strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result  # our names are V3.2's by design
    config.dtype = next(iter(state.values())).dtype
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

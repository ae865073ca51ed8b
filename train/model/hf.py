"""Hugging Face checkpoints: the supported families, the key table, and validation of a checkpoint directory (the
export that writes them is train/export.py).

On disk, DeepSeek checkpoints keep one tensor per expert (`mlp.experts.{e}.gate_proj.weight`); transformers
fuses them in memory (`mlp.experts.gate_up_proj`). Our model uses the in-memory names; `disk_shapes` maps between
the two (the export goes through transformers' own reverse conversion, so that its files are what
`save_pretrained` would write).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch


# The source families a conversion starts from. MLA: DeepSeek-V3 / V3.2 (a query latent, which the indexer reads)
# and DeepSeek-V2 / V2-Lite (q_lora_rank null: the indexer reads the attention's input). GQA and MHA: the Llama
# layout with rotate-half RoPE, Qwen3's per-head q/k norms and Qwen2's biases included. `dsa` is this project's
# export of a family that transformers' `deepseek_v32` cannot express (the modeling code ships with it).
MLA_FAMILIES = ("deepseek_v3", "deepseek_v32", "deepseek_v2")
GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DSA_EXPORT = "dsa"
SUPPORTED_MODEL_TYPES = MLA_FAMILIES + GQA_FAMILIES + (DSA_EXPORT,)
# config.json keys of a `dsa` export that are not the source family's
DSA_KEYS = ("source_model_type", "index_n_heads", "index_head_dim", "index_rope_dim", "index_topk", "auto_map")
MODELING_FILE = "modeling_dsa.py"  # the export's modeling code (train/model/hf_modeling_dsa.py)


def family(config: dict) -> str:
    """The source family of a config: its model_type, or for a `dsa` export the family it was converted from."""
    return config.get("source_model_type") if config.get("model_type") == DSA_EXPORT else config.get("model_type")


def is_mla(config: dict) -> bool:
    return family(config) in MLA_FAMILIES


def has_query_latent(config: dict) -> bool:
    """MLA with a query latent (q_lora_rank): the indexer's queries come from it, as in DeepSeek-V3.2."""
    return is_mla(config) and bool(config.get("q_lora_rank"))


def exports_as_v32(config: dict) -> bool:
    """Whether the converted model is a transformers `deepseek_v32` (DeepSeek-V3 MLA with a query latent); the
    other families export as `dsa`."""
    return family(config) in ("deepseek_v3", "deepseek_v32") and has_query_latent(config)


def index_query_dim(config: dict) -> int:
    """Width of what the indexer's `wq_b` reads: MLA's query latent, or the attention's input (hidden size)."""
    return config["q_lora_rank"] if has_query_latent(config) else config["hidden_size"]


def family_config(config: dict) -> dict:
    """The source family's own config dict (a `dsa` export's without its DSA keys)."""
    if config.get("model_type") != DSA_EXPORT:
        return config
    out = {k: v for k, v in config.items() if k not in DSA_KEYS}
    out["model_type"] = config["source_model_type"]
    return out


def head_dim(config: dict) -> int:
    """The attention's per-head width of a GQA / MHA family."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_dim(config: dict) -> int:
    """RoPE dims of the attention's keys: MLA's decoupled rope key, or the rotated part of a GQA head."""
    if is_mla(config):
        return config["qk_rope_head_dim"]
    factor = config.get("partial_rotary_factor") or (config.get("rope_parameters") or {}).get("partial_rotary_factor")
    return int(head_dim(config) * (factor or 1.0))


# The indexer's checkpoint keys under `model.layers.{i}.self_attn.indexer.` and their shapes .
INDEXER_KEYS = {
    "wq_b.weight": lambda c: (c["index_n_heads"] * c["index_head_dim"], index_query_dim(c)),
    "wk.weight": lambda c: (c["index_head_dim"], c["hidden_size"]),
    "k_norm.weight": lambda c: (c["index_head_dim"],),
    "k_norm.bias": lambda c: (c["index_head_dim"],),
    "weights_proj.weight": lambda c: (c["index_n_heads"], c["hidden_size"]),
}
INDEXER_PREFIX = "model.layers.{i}.self_attn.indexer."

class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the file and the key."""


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory of a supported family (or an export), checked for what DSA needs."""
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
    families = ", ".join(MLA_FAMILIES + GQA_FAMILIES)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{cfg_file}: key 'model_type' is {model_type!r}; allowed: {families} (and this project's own "
            f"'{DSA_EXPORT}' exports). Sliding-window and hybrid-attention families (Gemma, Qwen3-Next, ...) are "
            "refused: DSA replaces full causal attention"
        )
    if model_type == DSA_EXPORT and config.get("source_model_type") not in MLA_FAMILIES + GQA_FAMILIES:
        raise CheckpointError(f"{cfg_file}: key 'source_model_type' is {config.get('source_model_type')!r}; "
                              f"allowed: {families}")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise CheckpointError(
            f"{cfg_file}: key 'quantization_config' ({method}): the weights are quantised and training runs in "
            f"bf16; write a bf16 copy first (FP8: `make dequantize SRC={directory} DST=<new dir>`) and use that"
        )
    _check_family(config, cfg_file)
    return config


def _check_family(config: dict, where) -> None:
    """What DSA needs of a supported family's config; raises CheckpointError naming the key."""
    kind = family(config)
    if kind == "deepseek_v3" and config.get("rope_interleave", True) is not True:
        raise CheckpointError(f"{where}: key 'rope_interleave' is {config['rope_interleave']!r}; only the "
                              "interleaved MLA RoPE layout (true) is supported")
    if kind in GQA_FAMILIES:
        window = config.get("sliding_window") if kind == "mistral" or config.get("use_sliding_window") else None
        types = set(config.get("layer_types") or ["full_attention"])
        if window or types != {"full_attention"}:
            raise CheckpointError(f"{where}: sliding-window attention (key 'sliding_window' is {window!r}, "
                                  f"'layer_types' {sorted(types)}); allowed: full causal attention in every layer "
                                  "(sliding_window null, use_sliding_window false)")
        heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads") or \
            config.get("num_attention_heads")
        if not heads or heads % kv_heads:
            raise CheckpointError(f"{where}: key 'num_key_value_heads' is {kv_heads}; it must divide "
                                  f"num_attention_heads={heads}")


def source_config(path: str | None, arch: dict) -> dict:
    """The config dict of the model a stage starts from: `path`'s config.json (checked), or the transformers config
    of `arch` (its `model_type`, default deepseek_v3, with transformers' defaults filled in)."""
    if path is not None:
        return read_config(path)
    return arch_config(arch)


def arch_config(arch: dict) -> dict:
    """The full config dict of an architecture given by `model.arch` (its `model_type`, default deepseek_v3)."""
    from transformers import AutoConfig

    fields = dict(arch)
    model_type = fields.pop("model_type", "deepseek_v3")
    if model_type not in MLA_FAMILIES + GQA_FAMILIES:
        raise CheckpointError(f"model.arch.model_type={model_type!r}; allowed: "
                              f"{', '.join(MLA_FAMILIES + GQA_FAMILIES)}")
    config = AutoConfig.for_model(model_type, **fields).to_dict()
    _check_family(config, "model.arch")
    return config


def meta_model(config: dict):
    """A transformers model of this config on the meta device (shapes only, no memory): the source family's model
    (without indexers) for a `dsa` config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**family_config(config))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def disk_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds on disk, with its shape."""
    shapes = {}
    expert = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
    for name, tensor in meta_model(config).state_dict().items():
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
    if config.get("model_type") == DSA_EXPORT:
        for i in range(config["num_hidden_layers"]):
            shapes.update({INDEXER_PREFIX.format(i=i) + key: shape_of(config) for key, shape_of in INDEXER_KEYS.items()})
    return shapes


def _is_extra_layer(key: str, num_layers: int) -> bool:
    """DeepSeek ships its multi-token-prediction module as layer `num_hidden_layers`; training ignores it."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return m is not None and int(m.group(1)) >= num_layers


def _open_safetensors(file: Path):
    """safe_open, with a damaged file (truncated, not safetensors) named in a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); a truncated or damaged copy? "
                              "copy it again from the original checkpoint") from None


def validate_checkpoint(path: str | os.PathLike) -> dict:
    """Checks config.json and every safetensors header against the architecture; returns the config.

    Raises CheckpointError naming the file and the key for a missing, unexpected or mis-shaped tensor.
    Reads headers only, so it is cheap even for a 671B checkpoint.
    """

    config = read_config(path)
    directory = Path(path)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weight files")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        absent = [name for name in named if not (directory / name).is_file()]
        if absent:
            raise CheckpointError(f"{index}: names shard {absent[0]}, which is not in {directory} "
                                  f"({len(absent)} of {len(named)} shards missing); copy the whole checkpoint")
    expected = disk_shapes(config)
    seen = set()
    for file in files:
        with _open_safetensors(file) as f:
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


def own_export(path: str | os.PathLike) -> bool:
    """Whether `path` holds this project's `dsa` export, whose modeling code (ours) loaders may run: transformers'
    Auto classes read its `auto_map` even for the tokenizer, and would otherwise ask whether to trust it."""
    cfg_file = Path(path) / "config.json"
    try:
        return json.loads(cfg_file.read_text()).get("model_type") == DSA_EXPORT
    except (OSError, ValueError):
        return False


def read_indexers(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every indexer tensor (`model.layers.{i}.self_attn.indexer.*`) of a checkpoint directory, by key."""
    directory, out = Path(path), {}
    for file in sorted(directory.glob("*.safetensors")):
        with _open_safetensors(file) as f:
            out.update({key: f.get_tensor(key) for key in f.keys() if ".indexer." in key})
    return out

"""Hugging Face checkpoints: the key table, validation of a checkpoint directory, and the DeepSeek-V3.2 export.

On disk, DeepSeek checkpoints keep one tensor per expert (`mlp.experts.{e}.gate_proj.weight`); transformers
fuses them in memory (`mlp.experts.gate_up_proj`). Our model uses the in-memory names; `disk_shapes`
maps between the two, and export goes through transformers' own reverse conversion, shard by shard, so
that the files are what `save_pretrained` would write and transformers, vLLM and SGLang read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from train.files import atomic_directory, safetensors_weight_map, write_shard_index

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32")

# The indexer's checkpoint keys under `model.layers.{i}.self_attn.indexer.` and their shapes .
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


def source_config(path: str | None, arch: dict) -> dict:
    """The config dict of the model a stage starts from: `path`'s config.json (checked), or the DeepseekV3Config
    of `arch` (with transformers' defaults filled in)."""
    if path is not None:
        return read_config(path)
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**arch).to_dict()


def meta_model(config: dict):
    """A transformers model of this config on the meta device (shapes only, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
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


def v32_config(source_config: dict, index_n_heads: int, index_head_dim: int, index_topk: int):
    """The DeepseekV32Config of a converted model: the source architecture plus the DSA fields."""
    from transformers import DeepseekV32Config

    fields = {f.name for f in dataclasses.fields(DeepseekV32Config)} - _NOT_EXPORTED
    kwargs = {k: v for k, v in source_config.items() if k in fields}
    kwargs.update(index_n_heads=index_n_heads, index_head_dim=index_head_dim, index_topk=index_topk)
    config = DeepseekV32Config(**kwargs)
    config.architectures = ["DeepseekV32ForCausalLM"]
    return config


def layer_groups(keys) -> list[list[str]]:
    """State-dict keys grouped for streaming: one group per decoder layer (`model.layers.{i}.`), one for each
    key outside the layers; in model order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        group = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] and len(parts) > 3 else key
        groups.setdefault(group, []).append(key)
    return list(groups.values())


class _ShardWriter:
    """Safetensors shards of at most `max_bytes` (a larger single group gets a shard of its own), named and
    indexed the way `save_pretrained` names them."""

    def __init__(self, folder: Path, max_bytes: int, log=None):
        self.folder, self.max_bytes, self.log = folder, max_bytes, log
        self.files: list[list[str]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            save_file({k: v.contiguous() for k, v in self.pending.items()},
                      str(self.folder / f"part-{len(self.files)}.safetensors"), metadata={"format": "pt"})
            self.files.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0
            if self.log:
                done = self.total_bytes  # flush runs before the next group is added: all of it is written
                size = f"{done / 2**30:.2f} GiB" if done >= 2**30 else f"{done / 2**20:.1f} MiB"
                self.log(f"[export] shard {len(self.files)} written ({size} so far)")

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.folder / "part-0.safetensors", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"part-{i}.safetensors", self.folder / name)
            weight_map.update({k: name for k in keys})
        write_shard_index(self.folder, weight_map, self.total_bytes)


def _from_source(part: dict[str, torch.Tensor], source: Path, weight_map: dict[str, str]) -> dict:
    """`part` (on-disk names) with every tensor outside the indexers read from the checkpoint `source`."""
    from safetensors import safe_open

    out = dict(part)
    for key, tensor in part.items():
        if ".indexer." in key:
            continue
        if key not in weight_map:
            raise RuntimeError(f"export: {key!r} is in no *.safetensors file of {source}")
        with safe_open(str(source / weight_map[key]), framework="pt") as f:
            out[key] = f.get_tensor(key)
        if out[key].shape != tensor.shape:
            raise RuntimeError(f"export: {key!r} of {source} has shape {list(out[key].shape)}, the model's "
                               f"{list(tensor.shape)}")
    return out


def export_hf(model, out_dir: str | os.PathLike, dtype: torch.dtype | None = None, tokenizer=None,
              dense_only: bool = False, groups=None, max_shard_bytes: int = 5 * 2**30, log=None,
              backbone_from: str | os.PathLike | None = None) -> Path:
    """Writes `model` (a DSAForCausalLM) as a `deepseek_v32` Hugging Face directory, atomically.

    `dense_only` writes the backbone alone as `deepseek_v3` (a dense source, e.g. `make base`'s model).
    `groups`: the weights, as an iterable of partial state dicts (default: `model.state_dict()` one decoder
    layer at a time; training passes CPU copies gathered layer by layer, `engine.state_dict_groups`). They are
    written as they come, in shards of at most `max_shard_bytes`, in the on-disk layout transformers'
    `save_pretrained` writes (its own reverse weight conversion: experts un-fused), so no more than one shard
    is ever held. `log` (e.g. print) gets a line per shard written. The files (and the tokenizer, if given)
    appear under `out_dir` only once complete. `backbone_from`: a checkpoint whose tensors are written instead of
    the model's for every key outside the indexers (the warm-up's frozen backbone, byte for byte, whatever
    dtype training computed in); shapes are checked.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    if dense_only:
        fields = {f.name for f in dataclasses.fields(DeepseekV3Config)} - _NOT_EXPORTED
        config = DeepseekV3Config(**{k: v for k, v in model.source_config.items() if k in fields})
        config.architectures = ["DeepseekV3ForCausalLM"]
        model_class = DeepseekV3ForCausalLM
    else:
        config = v32_config(model.source_config, model.index_n_heads, model.index_head_dim, model.index_topk)
        model_class = DeepseekV32ForCausalLM
    with torch.device("meta"):
        hf_model = model_class(config)
    expected = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}  # our names are V3.2's by design
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    if groups is None:
        state = model.state_dict()
        groups = ({k: state[k] for k in keys} for keys in layer_groups(state))
    source_map = safetensors_weight_map(backbone_from) if backbone_from is not None else {}
    with atomic_directory(out_dir) as tmp:
        writer, seen, first_dtype = _ShardWriter(tmp, max_shard_bytes, log), set(), None
        for group in groups:
            part = {}
            for key, tensor in group.items():
                if (dense_only and ".indexer." in key) or (key == "lm_head.weight" and key not in expected):
                    continue  # the dense export has no indexers; a tied head is the embedding
                if key not in expected or tuple(tensor.shape) != expected[key]:
                    raise RuntimeError(f"export: {key!r} of shape {list(tensor.shape)} is not in the "
                                       f"{config.model_type} layout (expected {expected.get(key)})")
                tensor = tensor.detach()
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                first_dtype = first_dtype or tensor.dtype
                part[key] = tensor.cpu()
            seen.update(part)
            part = revert_weight_conversion(hf_model, part)
            if backbone_from is not None:
                part = _from_source(part, Path(backbone_from), source_map)
            writer.add(part)
        missing = sorted(set(expected) - seen)
        if missing:
            raise RuntimeError(f"export: {len(missing)} weights never came, e.g. {missing[0]!r}")
        writer.finish()
        config.dtype = first_dtype
        config.save_pretrained(tmp)
        hf_model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)

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
import shutil
from pathlib import Path

import torch

from train.files import atomic_directory, safetensors_weight_map, write_shard_index

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


def read_indexers(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every indexer tensor (`model.layers.{i}.self_attn.indexer.*`) of a checkpoint directory, by key."""
    directory, out = Path(path), {}
    for file in sorted(directory.glob("*.safetensors")):
        with _open_safetensors(file) as f:
            out.update({key: f.get_tensor(key) for key in f.keys() if ".indexer." in key})
    return out


def v32_config(source_config: dict, index_n_heads: int, index_head_dim: int, index_topk: int):
    """The DeepseekV32Config of a converted model: the source architecture plus the DSA fields."""
    from transformers import DeepseekV32Config

    fields = {f.name for f in dataclasses.fields(DeepseekV32Config)} - _NOT_EXPORTED
    kwargs = {k: v for k, v in source_config.items() if k in fields}
    kwargs.update(index_n_heads=index_n_heads, index_head_dim=index_head_dim, index_topk=index_topk)
    config = DeepseekV32Config(**kwargs)
    config.architectures = ["DeepseekV32ForCausalLM"]
    return config


def _dsa_config(source, model) -> dict:
    """config.json of a `dsa` export: the family's config (`source`, a transformers config), the indexer's sizes
    and where the modeling code is."""
    indexer = model.layers[0].self_attn.indexer
    config = source.to_dict() | {
        "model_type": DSA_EXPORT, "source_model_type": source.model_type, "architectures": ["DSAForCausalLM"],
        "index_n_heads": indexer.num_heads, "index_head_dim": indexer.head_dim, "index_rope_dim": indexer.rope_dim,
        "index_topk": indexer.topk,
        "auto_map": {"AutoConfig": "modeling_dsa.DSAConfig", "AutoModelForCausalLM": "modeling_dsa.DSAForCausalLM"},
    }
    config.pop("transformers_version", None)
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
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV32ForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    source = family_config(model.source_config)
    as_dsa = not dense_only and not exports_as_v32(model.source_config)
    if dense_only or as_dsa:
        config = AutoConfig.for_model(**{k: v for k, v in source.items()
                                         if k not in ("architectures", "transformers_version", "dtype")})
        config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
        model_class = AutoModelForCausalLM.from_config
    else:
        config = v32_config(model.source_config, model.index_n_heads, model.index_head_dim, model.index_topk)
        model_class = DeepseekV32ForCausalLM
    with torch.device("meta"):
        hf_model = model_class(config)
    expected = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}  # our names are the family's
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    dsa_config = None
    if as_dsa:  # the family's keys plus the indexers' (shapes from our model's own indexers)
        dsa_config = _dsa_config(config, model)
        for i in range(config.num_hidden_layers):
            expected.update({INDEXER_PREFIX.format(i=i) + key: shape_of(dsa_config)
                             for key, shape_of in INDEXER_KEYS.items()})
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
            indexers = {k: part.pop(k) for k in [k for k in part if ".indexer." in k]} if as_dsa else {}
            part = revert_weight_conversion(hf_model, part) | indexers
            if backbone_from is not None:
                part = _from_source(part, Path(backbone_from), source_map)
            writer.add(part)
        missing = sorted(set(expected) - seen)
        if missing:
            raise RuntimeError(f"export: {len(missing)} weights never came, e.g. {missing[0]!r}")
        writer.finish()
        config.dtype = first_dtype
        if as_dsa:
            dsa_config["dtype"] = str(first_dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(dsa_config, indent=2, sort_keys=True) + "\n")
            shutil.copyfile(Path(__file__).with_name("hf_modeling_dsa.py"), tmp / MODELING_FILE)
        else:
            config.save_pretrained(tmp)
        hf_model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)

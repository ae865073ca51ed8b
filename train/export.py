"""Export: a DSA model as a Hugging Face directory, and `python -m train.export` (surgery and export in one go).

The export is `deepseek_v32` for DeepSeek-V3-family conversions (what transformers, vLLM and SGLang load by the same
key names) and `dsa` for the other families (the family's config and key names, the indexers, and this project's
modeling code, `modeling_dsa.py`, via `auto_map`). Training writes it at the end of a stage (`export_stage`),
streamed one decoder layer at a time; the command line converts a checkpoint without training: from a dense source
it attaches fresh indexers (what `make warmup` starts from), from an export it re-exports (e.g. another
`index_topk` or dtype). Everything is validated before anything is written, and the output appears only once
complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from train import engine as eng
from train.files import atomic_directory, safetensors_weight_map, write_shard_index
from train.model import ModelConfig, build_model
from train.model.hf import (
    DSA_EXPORT,
    INDEXER_KEYS,
    INDEXER_PREFIX,
    MODELING_FILE,
    CheckpointError,
    exports_as_v32,
    family_config,
    own_export,
)
from train.model.surgery import DTYPES

# Source config keys that DeepseekV32Config derives itself or that do not describe the architecture.
_NOT_EXPORTED = {"architectures", "transformers_version", "head_dim", "mlp_layer_types", "layer_types", "dtype"}


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
            shutil.copyfile(Path(__file__).parent / "model" / "hf_modeling_dsa.py", tmp / MODELING_FILE)
        else:
            config.save_pretrained(tmp)
        hf_model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)

def export_stage(engine, model, stage, tokenizer, out_dir: Path, source: str | None) -> None:
    """A training stage's export, in the checkpoint's own dtype; under ZeRO-3 every rank takes part in gathering
    each layer. The warm-up never changes the backbone, so its export writes the source's backbone tensors as they
    are (bit-identical even where training computed in another dtype)."""
    weights = eng.state_dict_groups(engine, layer_groups)
    if eng.is_rank0():
        export_hf(model, out_dir, dtype=model.weights_dtype, tokenizer=tokenizer, dense_only=stage.name == "base",
                  groups=weights, log=eng.print0, backbone_from=source if not stage.trains_backbone else None)
    else:
        for _ in weights:
            pass


def convert_checkpoint(cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Surgery and export; the source's tokenizer (where it has one) goes along."""
    from transformers import AutoTokenizer

    model = build_model(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True,
                                                  trust_remote_code=own_export(cfg.path))
    except (OSError, ValueError):  # a checkpoint without a tokenizer: the export has none either
        tokenizer = None
    return export_hf(model, out_dir, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="local Hugging Face directory of a supported family, or an export")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--index-n-heads", type=int, default=None)
    p.add_argument("--index-head-dim", type=int, default=None)
    p.add_argument("--index-topk", type=int, default=None, help="default: the source's, else 2048")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the source's own")
    args = p.parse_args(argv)
    cfg = ModelConfig(path=args.source, index_n_heads=args.index_n_heads, index_head_dim=args.index_head_dim,
                      index_topk=args.index_topk, dtype=args.dtype)
    try:
        out = convert_checkpoint(cfg, args.out)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model surgery: the one step that turns a transformers DeepSeek-V3 model into our DSA model.

This is the only module that knows transformers' module paths. Backbone modules are moved over as they
are (weights unchanged, not copied); each layer gains a lightning indexer, fresh for a dense source or
copied (shapes asserted) from a `deepseek_v32` source such as our own warm-up export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from train.model import hf
from train.model.attention import DSAAttention
from train.model.indexer import Indexer
from train.model.transformer import DSABackbone, DSADecoderLayer, DSAForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Where the model comes from and the DSA fields it gains."""

    path: str | None = None                 # local HF directory (deepseek_v3 source or deepseek_v32 export)
    arch: dict[str, Any] = field(default_factory=dict)  # DeepseekV3Config fields when path is null
    index_n_heads: int | None = None        # null: the checkpoint's (deepseek_v32), else scaled to the model
    index_head_dim: int | None = None       # null: the checkpoint's (deepseek_v32), else scaled to the model
    index_topk: int | None = None           # null: the checkpoint's (deepseek_v32), else 2048
    dtype: str | None = None                # weights' dtype; null: the checkpoint's own (float32 from `arch`)
    init_seed: int = 0                      # weights built from `arch`, and fresh indexers

    def validate(self) -> None:
        if self.path is None and not self.arch:
            raise ValueError("model.path is null and model.arch is empty: give a checkpoint directory "
                             "(model.path=/path/to/hf_dir) or an architecture (model=tiny)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        for key in ("index_n_heads", "index_head_dim", "index_topk"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"model.{key}={value}; must be >= 1 (or null)")


def build_source_model(cfg: ModelConfig):
    """The transformers model the conversion starts from: loaded from `cfg.path`, or built from `cfg.arch`."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    if cfg.path is not None:
        hf.validate_checkpoint(cfg.path)  # clear errors before transformers' own (which may only warn)
        return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype or "auto")
    torch.manual_seed(cfg.init_seed)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.arch)).to(dtype or torch.float32)


def convert_to_dsa(source, cfg: ModelConfig) -> DSAForCausalLM:
    """Builds the DSA model from a DeepseekV3ForCausalLM or DeepseekV32ForCausalLM (consumed: modules move)."""
    src_cfg = source.config
    if src_cfg.model_type == "deepseek_v3" and not getattr(src_cfg, "rope_interleave", True):
        raise ValueError("source config rope_interleave=False: only the interleaved MLA layout exports to deepseek_v32")
    if not src_cfg.q_lora_rank:
        raise ValueError(f"source config q_lora_rank={src_cfg.q_lora_rank!r}: DSA needs MLA's query latent")
    index = index_config(src_cfg.to_dict(), cfg)
    n_heads, head_dim = index["index_n_heads"], index["index_head_dim"]
    dtype = next(source.parameters()).dtype
    generator = torch.Generator().manual_seed(cfg.init_seed + 1)
    layers = []
    for i, src_layer in enumerate(source.model.layers):
        a = src_layer.self_attn
        indexer = Indexer(src_cfg.hidden_size, src_cfg.q_lora_rank, n_heads, head_dim, src_cfg.qk_rope_head_dim,
                          index["index_topk"], init_std=src_cfg.initializer_range).to(dtype)
        if hasattr(a, "indexer"):
            _copy_indexer(a.indexer, indexer, i, src_cfg.to_dict() | index)
        else:
            indexer.reset_parameters(generator)
        attn = DSAAttention(
            q_a_proj=a.q_a_proj, q_a_layernorm=a.q_a_layernorm, q_b_proj=a.q_b_proj,
            kv_a_proj_with_mqa=a.kv_a_proj_with_mqa, kv_a_layernorm=a.kv_a_layernorm, kv_b_proj=a.kv_b_proj,
            o_proj=a.o_proj, indexer=indexer, num_heads=src_cfg.num_attention_heads,
            qk_nope_head_dim=src_cfg.qk_nope_head_dim, qk_rope_head_dim=src_cfg.qk_rope_head_dim,
            v_head_dim=src_cfg.v_head_dim, kv_lora_rank=src_cfg.kv_lora_rank, softmax_scale=a.scaling,
        )
        layers.append(DSADecoderLayer(src_layer.input_layernorm, attn, src_layer.post_attention_layernorm,
                                      src_layer.mlp))
    backbone = DSABackbone(source.model.embed_tokens, layers, source.model.norm, source.model.rotary_emb)
    source_config = {k: v for k, v in src_cfg.to_dict().items() if not k.startswith("index_")}
    return DSAForCausalLM(backbone, source.lm_head, source_config)


def new_indexer_dims(source: dict) -> tuple[int, int]:
    """(heads, head dim) of a fresh indexer, scaled to the model the way DeepSeek-V3.2 sized its own: half the
    attention heads (64 of 128) and the attention's no-RoPE head dim (128), each at most DeepSeek's. A 7168-wide
    model gets DeepSeek's 64 x 128; a small model a proportionally small indexer."""
    heads = max(1, min(64, source["num_attention_heads"] // 2))
    head_dim = max(source["qk_rope_head_dim"], min(128, source["qk_nope_head_dim"]))
    return heads, head_dim


def index_config(source: dict, cfg: ModelConfig) -> dict[str, int]:
    """The indexer's `index_n_heads`, `index_head_dim` and `index_topk`: the checkpoint's own where it has an
    indexer (deepseek_v32: our warm-up export), unless the config sets them; else the config's, else the
    defaults (`new_indexer_dims`, top-2048). The shapes of an existing indexer cannot change."""
    heads, head_dim = new_indexer_dims(source)
    out = {}
    for key, default in (("index_n_heads", heads), ("index_head_dim", head_dim), ("index_topk", 2048)):
        wanted, stored = getattr(cfg, key), source.get(key)
        if key != "index_topk" and stored is not None and wanted is not None and wanted != stored:
            raise ValueError(f"model.{key}={wanted} but the checkpoint's indexer has {key}={stored}; "
                             f"set model.{key}=null (or {stored})")
        out[key] = wanted if wanted is not None else stored if stored is not None else default
    return out


def _copy_indexer(src, dst: Indexer, layer: int, config: dict) -> None:
    src_state = src.state_dict()
    prefix = hf.INDEXER_PREFIX.format(i=layer)
    for key, shape_of in hf.INDEXER_KEYS.items():
        expected = shape_of(config)
        if key not in src_state:
            raise ValueError(f"source indexer of layer {layer} lacks {prefix}{key}")
        if tuple(src_state[key].shape) != expected:
            raise ValueError(f"{prefix}{key}: shape {list(src_state[key].shape)}, expected {list(expected)}")
    dst.load_state_dict(src_state, strict=True)


def build_model(cfg: ModelConfig) -> DSAForCausalLM:
    """The DSA model described by `cfg`: source built or loaded, then converted."""
    cfg.validate()
    return convert_to_dsa(build_source_model(cfg), cfg)

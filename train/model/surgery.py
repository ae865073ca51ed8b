"""Model surgery: the one step that turns a transformers model of a supported family (DeepSeek-V3 / V3.2 / V2
MLA; Llama, Mistral, Qwen2, Qwen3 GQA) into our DSA model.

This is the only module that knows transformers' module paths. Backbone modules are moved over as they
are (weights unchanged, not copied); each layer gains a lightning indexer, fresh for a dense source or
copied (shapes asserted) from a `deepseek_v32` or `dsa` source such as our own warm-up export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from train.model import hf
from train.model.attention import DSAAttention, GQAAttention
from train.model.indexer import Indexer
from train.model.transformer import DSABackbone, DSADecoderLayer, DSAForCausalLM
from train.ops import check_index_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Where the model comes from and the DSA fields it gains."""

    path: str | None = None                 # local HF directory (deepseek_v3 source or deepseek_v32 export)
    arch: dict[str, Any] = field(default_factory=dict)  # config fields when path is null (`model_type`: its
                                                        # family, default deepseek_v3)
    index_n_heads: int | None = None        # null: the checkpoint's (deepseek_v32), else scaled to the model
    index_head_dim: int | None = None       # null: the checkpoint's (deepseek_v32), else scaled to the model
    index_topk: int | None = None           # null: the checkpoint's (deepseek_v32), else 2048
    dtype: str | None = None                # weights' dtype; null: the checkpoint's own (float32 from `arch`)
    index_dtype: str = "auto"               # the indexer's top-k: fp8 (DeepSeek's e4m3 form), bf16, or auto (fp8
                                            # on Hopper GPUs); its KL and gradients stay in the weights' dtype
    init_seed: int = 0                      # weights built from `arch`, and fresh indexers

    def validate(self) -> None:
        if self.path is None and not self.arch:
            raise ValueError("model.path is null and model.arch is empty: give a checkpoint directory "
                             "(model.path=/path/to/hf_dir) or an architecture (model=tiny)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        check_index_dtype(self.index_dtype)
        for key in ("index_n_heads", "index_head_dim", "index_topk"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"model.{key}={value}; must be >= 1 (or null)")


def build_source_model(cfg: ModelConfig):
    """(the transformers model the conversion starts from, its indexers' tensors by checkpoint key or None): loaded
    from `cfg.path`, or built from `cfg.arch`. A `dsa` export (this project's, for families transformers'
    `deepseek_v32` cannot express) loads as its source family's model; its indexers come from its files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    if cfg.path is not None:
        config = hf.validate_checkpoint(cfg.path)  # clear errors before transformers' own (which may only warn)
        if config["model_type"] != hf.DSA_EXPORT:
            return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype or "auto"), None
        family = AutoConfig.for_model(**hf.family_config(config))
        model = _quietly(lambda: AutoModelForCausalLM.from_pretrained(cfg.path, config=family,
                                                                      dtype=dtype or "auto"))
        for key in ("index_n_heads", "index_head_dim", "index_topk"):  # the indexers' sizes, as a v32 config has
            setattr(model.config, key, config[key])
        return model, hf.read_indexers(cfg.path)
    torch.manual_seed(cfg.init_seed)
    config = AutoConfig.for_model(**hf.arch_config(cfg.arch))
    return AutoModelForCausalLM.from_config(config).to(dtype or torch.float32), None


def _quietly(load):
    """`load()` with transformers' warnings held back: loading a `dsa` export as its family's model reports the
    indexer tensors as unexpected keys, which they are meant to be (they are read separately, and checked)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load()
    finally:
        logging.set_verbosity(level)


def convert_to_dsa(source, cfg: ModelConfig, indexers: dict[str, torch.Tensor] | None = None) -> DSAForCausalLM:
    """Builds the DSA model from a transformers model of a supported family (consumed: modules move). Indexers come
    from `indexers` (checkpoint keys, a `dsa` export's), from the source's own (`deepseek_v32`), or fresh."""
    src = source.config.to_dict()
    hf._check_family(src, "source config")
    index = index_config(src, cfg)
    n_heads, head_dim = index["index_n_heads"], index["index_head_dim"]
    dtype = next(source.parameters()).dtype
    generator = torch.Generator().manual_seed(cfg.init_seed + 1)
    rope = hf.rope_dim(src)
    layers = []
    for i, src_layer in enumerate(source.model.layers):
        a = src_layer.self_attn
        indexer = Indexer(src["hidden_size"], hf.index_query_dim(src), n_heads, head_dim, rope, index["index_topk"],
                          init_std=src.get("initializer_range", 0.02), index_dtype=cfg.index_dtype).to(dtype)
        tensors = indexers
        if hasattr(a, "indexer"):  # a deepseek_v32 source: this layer's own indexer
            tensors = {hf.INDEXER_PREFIX.format(i=i) + k: v for k, v in a.indexer.state_dict().items()}
        if tensors is not None:
            _copy_indexer(tensors, indexer, i, src | index)
        else:
            indexer.reset_parameters(generator)
        attn = _mla_attention(src, a, indexer) if hf.is_mla(src) else _gqa_attention(src, a, indexer)
        layers.append(DSADecoderLayer(src_layer.input_layernorm, attn, src_layer.post_attention_layernorm,
                                      src_layer.mlp))
    rotary = source.model.rotary_emb
    if hf.family(src) == "deepseek_v2":
        rotary = ComplexRotary(rotary)
    backbone = DSABackbone(source.model.embed_tokens, layers, source.model.norm, rotary)
    source_config = {k: v for k, v in hf.family_config(src).items() if not k.startswith("index_")}
    return DSAForCausalLM(backbone, source.lm_head, source_config)


def _mla_attention(src: dict, a, indexer: Indexer) -> DSAAttention:
    q = dict(q_proj=a.q_proj) if not src.get("q_lora_rank") else dict(
        q_a_proj=a.q_a_proj, q_a_layernorm=a.q_a_layernorm, q_b_proj=a.q_b_proj)
    return DSAAttention(
        **q, kv_a_proj_with_mqa=a.kv_a_proj_with_mqa, kv_a_layernorm=a.kv_a_layernorm, kv_b_proj=a.kv_b_proj,
        o_proj=a.o_proj, indexer=indexer, num_heads=src["num_attention_heads"],
        qk_nope_head_dim=src["qk_nope_head_dim"], qk_rope_head_dim=src["qk_rope_head_dim"],
        v_head_dim=src["v_head_dim"], kv_lora_rank=src["kv_lora_rank"], softmax_scale=a.scaling,
    )


def _gqa_attention(src: dict, a, indexer: Indexer) -> GQAAttention:
    heads = src["num_attention_heads"]
    return GQAAttention(
        q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj, o_proj=a.o_proj, q_norm=getattr(a, "q_norm", None),
        k_norm=getattr(a, "k_norm", None), indexer=indexer, num_heads=heads,
        num_kv_heads=src.get("num_key_value_heads") or heads, head_dim=hf.head_dim(src), rope_dim=hf.rope_dim(src),
        softmax_scale=a.scaling,
    )


class ComplexRotary(nn.Module):
    """DeepSeek-V2's rotary module gives complex frequencies; the model takes (cos, sin) [B, L, R] laid out as
    cat(f, f), as DeepSeek-V3's and Llama's modules give them."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self.rotary(x, position_ids)
        cos, sin = freqs.real.to(x.dtype), freqs.imag.to(x.dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def new_indexer_dims(source: dict) -> tuple[int, int]:
    """(heads, head dim) of a fresh indexer, scaled to the model the way DeepSeek-V3.2 sized its own: half the
    attention heads (64 of 128), each at most DeepSeek's 64. Head dim: MLA's no-RoPE head dim (128), at most 128
    and at least the rope dims; GQA / MHA: the attention's own head dim, whose RoPE the indexer's keys take over
    whole. A 7168-wide DeepSeek-V3 gets DeepSeek's 64 x 128, Qwen3-32B (64 heads of 128) 32 x 128."""
    heads = max(1, min(64, source["num_attention_heads"] // 2))
    if hf.is_mla(source):
        return heads, max(source["qk_rope_head_dim"], min(128, source["qk_nope_head_dim"]))
    return heads, hf.head_dim(source)


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


def _copy_indexer(tensors: dict[str, torch.Tensor], dst: Indexer, layer: int, config: dict) -> None:
    prefix = hf.INDEXER_PREFIX.format(i=layer)
    state = {}
    for key, shape_of in hf.INDEXER_KEYS.items():
        expected = shape_of(config)
        if prefix + key not in tensors:
            raise ValueError(f"source indexer of layer {layer} lacks {prefix}{key}")
        if tuple(tensors[prefix + key].shape) != expected:
            raise ValueError(f"{prefix}{key}: shape {list(tensors[prefix + key].shape)}, expected {list(expected)}")
        state[key] = tensors[prefix + key]
    dst.load_state_dict(state, strict=True)


def build_model(cfg: ModelConfig) -> DSAForCausalLM:
    """The DSA model described by `cfg`: source built or loaded, then converted."""
    cfg.validate()
    source, indexers = build_source_model(cfg)
    return convert_to_dsa(source, cfg, indexers)

"""DeepSeek Sparse Attention on a grouped-query-attention source (Llama, Mistral, Qwen2, Qwen3) or on MLA without
a query latent (DeepSeek-V2, V2-Lite), for transformers: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`.

Written by dsa-train into every export of these families as `modeling_dsa.py`; it imports only torch and
transformers. The backbone is the source family's own transformers model (same weights, same key names); each
attention layer gains a lightning indexer (`self_attn.indexer.{wq_b,wk,k_norm,weights_proj}`) whose top-k
selection, one set of `index_topk` keys per query shared by all heads, is folded into the attention mask.
The indexer reads the attention's input x: I[t, s] = sum_g w[t, g] relu(q[t, g] . k[s]), with q = wq_b(x),
k = LayerNorm(wk(x)), w = weights_proj(x) / sqrt(G D), RoPE (rotate-half) on the first `index_rope_dim` dims of
q and k. Ties go to the lower position. A query with at most `index_topk` visible keys attends to all of them.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

_OWN_KEYS = ("source_model_type", "index_n_heads", "index_head_dim", "index_rope_dim", "index_topk", "auto_map",
             "architectures", "model_type", "transformers_version", "dtype")


class DSAConfig(PreTrainedConfig):
    """The source family's config fields, plus the family's name and the indexer's sizes."""

    model_type = "dsa"
    source_model_type: str = "llama"
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_rope_dim: int = 128
    index_topk: int = 2048

    def source_config(self) -> PreTrainedConfig:
        fields = {k: v for k, v in self.to_dict().items() if k not in _OWN_KEYS}
        return AutoConfig.for_model(self.source_model_type, **fields)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _cos_sin(position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, S, R] in the rotate-half layout cat(f, f), from a family's rotary output: (cos, sin) as Llama
    gives them, or DeepSeek-V2's complex frequencies."""
    if isinstance(position_embeddings, torch.Tensor) and position_embeddings.is_complex():
        cos, sin = position_embeddings.real, position_embeddings.imag
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return position_embeddings


class DSAIndexer(nn.Module):
    def __init__(self, config: DSAConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.topk = config.index_rope_dim, config.index_topk
        self.wq_b = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        R = self.rope_dim
        return torch.cat((x[..., :R] * cos + _rotate_half(x[..., :R]) * sin, x[..., R:]), dim=-1)

    @torch.no_grad()
    def select(self, x: torch.Tensor, position_embeddings, visible: torch.Tensor, cache, layer_idx: int):
        """[B, S, T] bool: the keys each of the S queries attends to among its visible ones (`visible`, [B, S, T])."""
        B, S, _ = x.shape
        cos, sin = _cos_sin(position_embeddings)
        q = self.wq_b(x).view(B, S, self.num_heads, self.head_dim)
        q = self._rope(q, cos[:, :, None].to(q.dtype), sin[:, :, None].to(q.dtype))
        k = self._rope(self.k_norm(self.wk(x)), cos.to(x.dtype), sin.to(x.dtype))
        if cache is not None:  # the indexer's keys of earlier tokens, kept beside the attention's cache
            keys = cache.__dict__.setdefault("dsa_index_keys", {})
            if layer_idx in keys:
                k = torch.cat((keys[layer_idx], k), dim=1)
            keys[layer_idx] = k
        w = self.weights_proj(x).float() * (self.num_heads**-0.5 * self.head_dim**-0.5)
        scores = torch.einsum("btgd,bsd->btgs", q.float(), k.float()).relu()
        logits = torch.einsum("btgs,btg->bts", scores, w).masked_fill(~visible, float("-inf"))
        kept = min(self.topk, logits.shape[-1])
        values, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: the lower position
        chosen = torch.zeros_like(visible)
        chosen.scatter_(-1, order[..., :kept], values[..., :kept] > float("-inf"))
        return chosen


def _visible(mask: torch.Tensor | None, B: int, S: int, T: int, device) -> torch.Tensor:
    """[B, S, T] bool: the keys the family's own mask lets each query see (None: causal over the last S of T)."""
    if mask is None:
        t = torch.arange(T - S, T, device=device)[:, None]
        return (torch.arange(T, device=device)[None, :] <= t).expand(B, S, T)
    mask = mask[:, 0, :, :T]
    return mask if mask.dtype == torch.bool else mask == 0


def _dsa_forward(self, *args, **kwargs):
    """The family attention's forward with the indexer's selection folded into its attention mask."""
    bound = inspect.signature(super(type(self), self).forward).bind(*args, **kwargs)
    named = bound.arguments
    x = named["hidden_states"]
    extra = named.get("kwargs", {})
    cache = named.get("cache", named.get("past_key_values", extra.get("past_key_values", extra.get("cache"))))
    B, S, _ = x.shape
    T = S + (cache.get_seq_length(self.layer_idx) if cache is not None else 0)
    visible = _visible(named.get("attention_mask"), B, S, T, x.device)
    chosen = self.indexer.select(x, named["position_embeddings"], visible, cache, self.layer_idx)
    named["attention_mask"] = torch.zeros(chosen.shape, dtype=x.dtype, device=x.device).masked_fill(
        ~chosen, torch.finfo(x.dtype).min)[:, None]
    return super(type(self), self).forward(*bound.args, **bound.kwargs)


class DSAForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DSAConfig
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config: DSAConfig):
        super().__init__(config)
        source = config.source_config()
        source._attn_implementation = "eager" if config._attn_implementation == "eager" else "sdpa"
        inner = AutoModelForCausalLM.from_config(source)
        self.model, self.lm_head = inner.model, inner.lm_head
        if getattr(source, "tie_word_embeddings", False):
            self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        for layer in self.model.layers:
            attn = layer.self_attn
            family = type(attn)
            attn.__class__ = type(f"DSA{family.__name__}", (family,), {"forward": _dsa_forward})
            attn.indexer = DSAIndexer(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

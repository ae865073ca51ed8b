"""The DSA model: a pre-norm decoder (DeepSeek's, Llama's, Qwen's, ...) whose attention layers carry lightning
indexers.

Plain single-device PyTorch. Parameter names equal the source family's transformers state dict plus the indexers'
(`deepseek_v32`'s for DeepSeek-V3), so export is a renaming-free hand-over (train/model/hf.py). Built only by
train/model/surgery.py.

Dimension legend: B batch, L sequence, C hidden, E vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.model.attention import AttentionMode, AttentionStats, CheckpointSlot, IndexedAttention
from train.model.context import ContextParallel


@contextmanager
def _in_slot(attn: IndexedAttention, slot: CheckpointSlot, replay: bool):
    attn.slot, slot.replay = slot, replay
    try:
        yield
    finally:
        attn.slot = None


def _slot_contexts(attn: IndexedAttention, keep_topk: bool):
    """checkpoint's context_fn: (around the forward, around the recomputation), sharing one CheckpointSlot."""
    slot = CheckpointSlot(keep_topk)
    return _in_slot(attn, slot, replay=False), _in_slot(attn, slot, replay=True)


class DSADecoderLayer(nn.Module):
    def __init__(self, input_layernorm: nn.Module, self_attn: IndexedAttention, post_attention_layernorm: nn.Module,
                 mlp: nn.Module):
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    def forward(self, h_BLC, cos_BLR, sin_BLR, mode: AttentionMode) -> torch.Tensor:
        h_BLC = h_BLC + self.self_attn(self.input_layernorm(h_BLC), cos_BLR, sin_BLR, mode)
        return h_BLC + self.mlp(self.post_attention_layernorm(h_BLC))


class DSABackbone(nn.Module):
    def __init__(self, embed_tokens: nn.Module, layers: list[DSADecoderLayer], norm: nn.Module,
                 rotary_emb: nn.Module):
        super().__init__()
        self.embed_tokens, self.layers, self.norm = embed_tokens, nn.ModuleList(layers), norm
        self.rotary_emb = rotary_emb  # transformers' module: the source's own frequencies (YaRN included)


class DSAForCausalLM(nn.Module):
    """`source_config` is the source checkpoint's config dict; the DSA fields of DeepseekV32Config (`index_*`)
    are the indexers' own."""

    def __init__(self, backbone: DSABackbone, lm_head: nn.Module, source_config: dict):
        super().__init__()
        self.model, self.lm_head = backbone, lm_head
        self.source_config = source_config
        self.activation_checkpointing = False
        self.keep_topk_for_recompute = True  # under checkpointing: keep each layer's top-k for its recomputation
        # The split of each sequence over ranks (train/model/context.py): the model takes whole sequences and
        # computes the rank's tokens; hidden states, per-layer stats and loss sums are the rank's.
        self.context_parallel = ContextParallel()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def index_n_heads(self) -> int:
        return self.layers[0].self_attn.indexer.num_heads

    @property
    def index_head_dim(self) -> int:
        return self.layers[0].self_attn.indexer.head_dim

    @property
    def index_topk(self) -> int:
        return self.layers[0].self_attn.indexer.topk

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.self_attn.indexer.parameters()]

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where the module reads a submodule's weight directly (sharding engines
        must gather it for that module's forward): MLA's sparse attention reads kv_b_proj absorbed."""
        return [(layer.self_attn, w) for layer in self.layers for w in layer.self_attn.external_weights()]

    def layer_stats(self) -> list[AttentionStats]:
        return [layer.self_attn.stats for layer in self.layers]

    def hidden_states(self, input_ids_BL: torch.Tensor, mode: AttentionMode) -> torch.Tensor:
        """Final-normed hidden states [B, L, C]; per-layer indexer outputs land in `layer_stats()`. Under context
        parallelism: of the rank's tokens, [B, L / size, C] (`context_parallel.shard` of the sequence)."""
        cp = self.context_parallel
        mode = dataclasses.replace(mode, cp=cp)
        h_BLC = self.model.embed_tokens(cp.shard(input_ids_BL))
        positions_BL = cp.positions(input_ids_BL.shape[1], input_ids_BL.device)[None]
        cos_BLR, sin_BLR = self.model.rotary_emb(h_BLC, positions_BL)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                keep = mode.sparse and self.keep_topk_for_recompute
                ctx = functools.partial(_slot_contexts, layer.self_attn, keep)
                h_BLC = checkpoint(layer, h_BLC, cos_BLR, sin_BLR, mode, use_reentrant=False, context_fn=ctx)
            else:
                h_BLC = layer(h_BLC, cos_BLR, sin_BLR, mode)
        return self.model.norm(h_BLC)

    def forward(self, input_ids_BL: torch.Tensor, mode: AttentionMode = AttentionMode(),
                labels_BL: torch.Tensor | None = None, head: bool = True):
        """Logits [B, L, E]; with `labels_BL`, `lm_loss`'s (sum, count), which never holds all logits at once;
        with head=False, `hidden_states`. Training calls this through the DeepSpeed engine (engine(...)):
        ZeRO-3 accumulates gradients over micro-batches correctly only for forwards that go through it."""
        if labels_BL is not None:
            return self.lm_loss(input_ids_BL, labels_BL, mode)
        if not head:
            return self.hidden_states(input_ids_BL, mode)
        return self.lm_head(self.hidden_states(input_ids_BL, mode))

    def lm_loss(self, input_ids_BL: torch.Tensor, labels_BL: torch.Tensor, mode: AttentionMode,
                chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of next-token cross-entropy over labels != -100, number of such tokens), over the rank's tokens.

        labels are aligned with input_ids (label t is the token after t). The LM head runs in chunks of
        `chunk_tokens` under activation checkpointing, so [tokens, vocab] logits never exist in full.
        """
        h_NC = self.hidden_states(input_ids_BL, mode).flatten(0, 1)
        labels_N = self.context_parallel.shard(labels_BL).flatten()
        total = h_NC.new_zeros((), dtype=torch.float32)
        # split, not slices: the hidden states' gradient is then one cat of the chunks', not a zero-filled
        # [tokens, hidden] tensor per chunk added up
        for h, y in zip(h_NC.split(chunk_tokens), labels_N.split(chunk_tokens)):
            total = total + checkpoint(_chunk_ce, self.lm_head, h, y, use_reentrant=False)
        return total, (labels_N != -100).sum()


def _chunk_ce(lm_head: nn.Module, h_NC: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h_NC).float(), labels_N, ignore_index=-100, reduction="sum")

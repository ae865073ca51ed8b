"""MLA attention with a lightning indexer, run in one of two modes chosen by the stage: dense or sparse.

Dense: the source model's MLA (per-head, non-absorbed), optionally with the warm-up indexer loss.
Sparse: each query attends to its layer's top-k tokens, in MLA's absorbed (MQA) form, where one gathered
latent row serves all heads; optionally with the sparse-stage indexer loss over the selected set.

Dimension legend: B batch, L sequence, C hidden, H heads, N qk_nope_head_dim, R qk_rope_head_dim,
V v_head_dim, A kv_lora_rank (latent), K selected tokens, G indexer heads.
Under context parallelism (`mode.cp`) L is the rank's tokens for queries and the whole sequence for keys: the
latent, the rope key and the indexer key are gathered over the group, and each piece of the rank's queries runs
at its global offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from train import ops
from train.model.context import ContextParallel
from train.model.indexer import Indexer, rope_interleaved


@dataclass(frozen=True)
class AttentionMode:
    """What an attention layer computes in a forward pass (set by the stage, never by editing code)."""

    sparse: bool = False          # top-k sparse attention instead of dense
    indexer_loss: bool = False    # compute the indexer KL (dense: full causal span; sparse: selected set)
    topk: int | None = None       # tokens per query in sparse mode and for the recall metric; None: the
                                  # indexer's own (`index_topk`); evaluation may ask for another
    keep_topk: bool = False       # keep the selection in `stats` (the probes read it; training does not, and
                                  # L x k indices per layer would otherwise stay alive until the next forward)
    cp: ContextParallel = ContextParallel()  # the sequence's split over ranks (set by the model, not the caller)


@dataclass
class AttentionStats:
    """Per-layer side outputs of the last forward, read by the stage after the model call."""

    kl_BL: torch.Tensor | None = None       # indexer KL per query (differentiable w.r.t. the indexer)
    recall_BL: torch.Tensor | None = None   # share of head-averaged dense attention inside the indexer's top-k
    topk_BLK: torch.Tensor | None = None    # selected positions (sparse mode), -1 = none


class CheckpointSlot:
    """One checkpointed run of a layer, shared by its forward and its recomputation in backward (`replay`).

    The recomputation leaves the layer's `stats` alone: they belong to the forward the loss was built from,
    and a recomputed indexer KL stored there would keep its graph (the indexer's outputs, the selection and
    the attention probabilities: ~5 GiB per layer at 128K tokens) alive after backward.
    With `keep_topk`, the forward's top-k selection is kept for the recomputation: it has no gradient, is the
    costliest part of the indexer, and the recomputation would find the same one (same inputs, deterministic
    kernels). Kept as int32: L x k x 4 bytes per layer until that layer's backward.
    In sparse mode the attention's per-head log-sum-exp is always kept (L x H x 4 bytes per layer): with it the
    recomputation gets the attention output and its probabilities in one pass (`ops.sparse_mla`)."""

    def __init__(self, keep_topk: bool):
        self.keep_topk, self.replay = keep_topk, False
        self._topk: tuple[torch.Tensor, torch.dtype] | None = None
        self.lse_BLH: torch.Tensor | None = None

    def keep(self, topk_BLK: torch.Tensor) -> None:
        if self.keep_topk:
            small = topk_BLK.shape[1] < 2**31
            self._topk = (topk_BLK.to(torch.int32) if small else topk_BLK, topk_BLK.dtype)

    def take(self) -> torch.Tensor | None:
        """The kept selection (once: it is freed here), or None when none was kept."""
        if self._topk is None:
            return None
        topk_BLK, dtype = self._topk
        self._topk = None
        return topk_BLK.to(dtype)

    def take_lse(self) -> torch.Tensor | None:
        """The forward's attention log-sum-exp (once), or None."""
        lse_BLH, self.lse_BLH = self.lse_BLH, None
        return lse_BLH


class DSAAttention(nn.Module):
    """DeepSeek-V3 MLA plus a lightning indexer. Parameter names match transformers' DeepseekV32Attention."""

    def __init__(self, *, q_a_proj: nn.Module, q_a_layernorm: nn.Module, q_b_proj: nn.Module,
                 kv_a_proj_with_mqa: nn.Module, kv_a_layernorm: nn.Module, kv_b_proj: nn.Module,
                 o_proj: nn.Module, indexer: Indexer, num_heads: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, kv_lora_rank: int, softmax_scale: float):
        super().__init__()
        self.q_a_proj, self.q_a_layernorm, self.q_b_proj = q_a_proj, q_a_layernorm, q_b_proj
        self.kv_a_proj_with_mqa, self.kv_a_layernorm, self.kv_b_proj = kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
        self.o_proj = o_proj
        self.indexer = indexer
        self.num_heads, self.nope_dim, self.rope_dim = num_heads, qk_nope_head_dim, qk_rope_head_dim
        self.v_dim, self.latent_dim, self.softmax_scale = v_head_dim, kv_lora_rank, softmax_scale
        self.stats = AttentionStats()
        self.slot: CheckpointSlot | None = None  # set by the model around checkpointed runs

    def forward(self, x_BLC: torch.Tensor, cos_BLR: torch.Tensor, sin_BLR: torch.Tensor,
                mode: AttentionMode) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        H, N, R = self.num_heads, self.nope_dim, self.rope_dim
        qr_BLQ = self.q_a_layernorm(self.q_a_proj(x_BLC))
        q_BLHD = self.q_b_proj(qr_BLQ).view(B, L, H, N + R)
        q_nope_BLHN = q_BLHD[..., :N]
        q_rope_BLHR = rope_interleaved(q_BLHD[..., N:], cos_BLR[:, :, None], sin_BLR[:, :, None])
        latent_BLA, k_rope_BLR = self.kv_a_proj_with_mqa(x_BLC).split([self.latent_dim, R], dim=-1)
        latent_BLA = self.kv_a_layernorm(latent_BLA)
        k_rope_BLR = rope_interleaved(k_rope_BLR, cos_BLR, sin_BLR)

        if mode.sparse or mode.indexer_loss:
            # The indexer learns only from its own loss: its inputs are cut from the main graph.
            qi_BLGD, ki_BLD, wi_BLG = self.indexer(x_BLC.detach(), qr_BLQ.detach(), cos_BLR, sin_BLR)
            ki_BLD = mode.cp.gather(ki_BLD)
        if mode.sparse or mode.cp.size > 1:  # the latent rows [latent | rope key]; the whole sequence's: one gather
            kv_BSD = mode.cp.gather(torch.cat((latent_BLA, k_rope_BLR), dim=-1))
        if mode.sparse:
            out_BLHV, stats = self._sparse(q_nope_BLHN, q_rope_BLHR, kv_BSD, qi_BLGD, ki_BLD, wi_BLG, mode)
        else:
            if mode.cp.size > 1:
                latent_BLA, k_rope_BLR = kv_BSD.split([self.latent_dim, R], dim=-1)
            out_BLHV, stats = self._dense(q_nope_BLHN, q_rope_BLHR, latent_BLA, k_rope_BLR, mode,
                                          (qi_BLGD, ki_BLD, wi_BLG) if mode.indexer_loss else None)
        if self.slot is None or not self.slot.replay:
            self.stats = stats
        return self.o_proj(out_BLHV.reshape(B, L, H * self.v_dim))

    def _dense(self, q_nope_BLHN, q_rope_BLHR, latent_BSA, k_rope_BSR, mode, indexer_out):
        """Queries [B, L, ...] (the rank's), keys [B, S, ...] (the whole sequence); S = L without context
        parallelism. Per-head keys and values come from the latent here, never from another rank."""
        B, L, H, N = q_nope_BLHN.shape
        S = latent_BSA.shape[1]
        kv_BSHX = self.kv_b_proj(latent_BSA).view(B, S, H, N + self.v_dim)
        k_BSHD = torch.cat((kv_BSHX[..., :N], k_rope_BSR[:, :, None].expand(B, S, H, self.rope_dim)), dim=-1)
        v_BSHV = kv_BSHX[..., N:]
        q_BLHD = torch.cat((q_nope_BLHN, q_rope_BLHR), dim=-1)
        pieces = mode.cp.chunks(S)
        out_BLHV = _by_piece(pieces, lambda lo, g, n: ops.dense_attention(
            q_BLHD[:, lo : lo + n], k_BSHD, v_BSHV, self.softmax_scale, q_offset=g))
        stats = AttentionStats()
        if indexer_out is not None:
            qi_BLGD, ki_BSD, wi_BLG = indexer_out
            kl_BL, recall_BL = _by_piece(pieces, lambda lo, g, n: ops.dense_indexer_kl(
                qi_BLGD[:, lo : lo + n], ki_BSD, wi_BLG[:, lo : lo + n], q_BLHD[:, lo : lo + n].detach(),
                k_BSHD.detach(), self.softmax_scale, mode.topk or self.indexer.topk, q_offset=g))
            stats = AttentionStats(kl_BL=kl_BL, recall_BL=recall_BL)
        return out_BLHV, stats

    def sparse_mla_kernels(self) -> str:
        """The kernels this layer's sparse attention runs, as the dispatch point picks them for its shapes, dtype
        and device (the plan's log line)."""
        w = self.kv_b_proj.weight
        q_nope = w.new_empty(1, 1, self.num_heads, self.nope_dim)
        return ops.sparse_mla_kernels_name(q_nope, w.new_empty(1, 1, self.latent_dim + self.rope_dim),
                                           self.latent_dim)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into W_UK [H, N, A] (absorbed into q) and W_UV [H, V, A] (applied after)."""
        w_HXA = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        return w_HXA[:, : self.nope_dim], w_HXA[:, self.nope_dim :]

    def _select(self, qi_BLGD, ki_BSD, wi_BLG, topk: int, cp: ContextParallel) -> torch.Tensor:
        slot = self.slot
        topk_BLK = slot.take() if slot is not None and slot.replay else None
        if topk_BLK is None:
            qi_BLGD, ki_BSD, wi_BLG = qi_BLGD.detach(), ki_BSD.detach(), wi_BLG.detach()
            topk_BLK = _by_piece(cp.chunks(ki_BSD.shape[1]), lambda lo, g, n: ops.indexer_topk(
                qi_BLGD[:, lo : lo + n], ki_BSD, wi_BLG[:, lo : lo + n], topk, q_offset=g))
            if slot is not None and not slot.replay:
                slot.keep(topk_BLK)
        return topk_BLK

    def _sparse(self, q_nope_BLHN, q_rope_BLHR, kv_BLD, qi_BLGD, ki_BLD, wi_BLG, mode):
        topk_BLK = self._select(qi_BLGD, ki_BLD, wi_BLG, mode.topk or self.indexer.topk, mode.cp)
        w_uk_HNA, w_uv_HVA = self.absorbed_weights()
        slot = self.slot
        replay = slot is not None and slot.replay
        out_BLHV, p_BLK, lse_BLH = ops.absorbed_sparse_mla(q_nope_BLHN, q_rope_BLHR, kv_BLD, topk_BLK, w_uk_HNA,
                                                           w_uv_HVA, self.softmax_scale,
                                                           slot.take_lse() if replay else None)
        if slot is not None and not replay:
            slot.lse_BLH = lse_BLH
        kl_BL = ops.sparse_indexer_kl(qi_BLGD, ki_BLD, wi_BLG, topk_BLK, p_BLK) if mode.indexer_loss else None
        return out_BLHV, AttentionStats(kl_BL=kl_BL, topk_BLK=topk_BLK if mode.keep_topk else None)


def _by_piece(pieces: list[tuple[int, int, int]], fn):
    """fn(local start, global start, length) for each piece of the rank's queries, joined along the sequence
    (outputs may be tensors or tuples of them); one piece: its output as it is."""
    outs = [fn(*piece) for piece in pieces]
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*outs))
    return torch.cat(outs, dim=1)

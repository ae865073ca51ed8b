"""Attention with a lightning indexer, run in one of two modes chosen by the stage: dense or sparse.

Two source forms: DeepSeek's MLA (`DSAAttention`) and grouped-query / multi-head attention (`GQAAttention`).
Dense: the source model's attention (MLA per-head, non-absorbed), optionally with the warm-up indexer loss.
Sparse: each query attends to its layer's top-k tokens, one selection for all heads: MLA in its absorbed (MQA)
form, where one gathered latent row serves all heads; GQA with each key head's rows serving its query heads;
optionally with the sparse-stage indexer loss over the selected set.

Dimension legend: B batch, L sequence, C hidden, H heads, N qk_nope_head_dim, R qk_rope_head_dim,
V v_head_dim, A kv_lora_rank (latent), K selected tokens, G indexer heads; GQA: J key heads, D head dim.
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
from train.model.indexer import Indexer, rope_interleaved, rope_non_interleaved


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
    kl_in_backward: bool = False            # kl_BL holds zeros until backward writes the KL (checkpointed layers)
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


class IndexedAttention(nn.Module):
    """What every attention with a lightning indexer shares: its side outputs and the top-k selection (kept for the
    checkpoint recomputation)."""

    def __init__(self, indexer: Indexer):
        super().__init__()
        self.indexer = indexer
        self.stats = AttentionStats()
        self.slot: CheckpointSlot | None = None  # set by the model around checkpointed runs

    def _select(self, qi_BLGD, ki_BSD, wi_BLG, topk: int, cp: ContextParallel) -> torch.Tensor:
        slot = self.slot
        topk_BLK = slot.take() if slot is not None and slot.replay else None
        if topk_BLK is None:
            qi_BLGD, ki_BSD, wi_BLG = qi_BLGD.detach(), ki_BSD.detach(), wi_BLG.detach()
            topk_BLK = _by_piece(cp.chunks(ki_BSD.shape[1]), lambda lo, g, n: ops.indexer_topk(
                qi_BLGD[:, lo : lo + n], ki_BSD, wi_BLG[:, lo : lo + n], topk, q_offset=g,
                index_dtype=self.indexer.index_dtype))
            if slot is not None and not slot.replay:
                slot.keep(topk_BLK)
        return topk_BLK

    def _attend_sparse(self, attend, qi_BLGD, ki_BLD, wi_BLG, topk_BLK, mode: AttentionMode):
        """The sparse attention, `attend(lse, probs) -> (out, p, lse)`, then the indexer KL over the selection:
        (out, stats). Without the KL the probabilities are not computed. In a checkpointed layer the KL is
        deferred to backward (`ops.sparse_indexer_kl`): the backward takes its target from the recomputation,
        which gets the output and probabilities in one pass from the forward's log-sum-exp, so the forward computes
        neither the probabilities nor the KL, and `stats.kl_BL` holds the KL once backward has run."""
        slot = self.slot
        deferred = mode.indexer_loss and slot is not None and any(x.requires_grad for x in (qi_BLGD, ki_BLD, wi_BLG))
        out, p_BLK, lse_BLH = attend(slot.take_lse() if slot is not None and slot.replay else None,
                                     mode.indexer_loss and not deferred)
        if slot is not None and not slot.replay:
            slot.lse_BLH = lse_BLH
        kl_BL = ops.sparse_indexer_kl(qi_BLGD, ki_BLD, wi_BLG, topk_BLK, p_BLK, deferred) if mode.indexer_loss else None
        return out, AttentionStats(kl_BL=kl_BL, kl_in_backward=deferred,
                                   topk_BLK=topk_BLK if mode.keep_topk else None)

    def _set_stats(self, stats: AttentionStats) -> None:
        if self.slot is None or not self.slot.replay:
            self.stats = stats

    def external_weights(self) -> list[nn.Parameter]:
        """Weights of submodules this module reads directly (sharding engines gather them for its forward)."""
        return []


class DSAAttention(IndexedAttention):
    """DeepSeek MLA plus a lightning indexer. Parameter names match transformers' DeepseekV32Attention (and, without
    a query latent, DeepseekV2Attention's `q_proj`). With a query latent (V3) the indexer reads it; without one
    (V2, V2-Lite) it reads the attention's input."""

    def __init__(self, *, q_a_proj: nn.Module | None = None, q_a_layernorm: nn.Module | None = None,
                 q_b_proj: nn.Module | None = None, q_proj: nn.Module | None = None,
                 kv_a_proj_with_mqa: nn.Module, kv_a_layernorm: nn.Module, kv_b_proj: nn.Module,
                 o_proj: nn.Module, indexer: Indexer, num_heads: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, kv_lora_rank: int, softmax_scale: float):
        super().__init__(indexer)
        if q_proj is None:
            self.q_a_proj, self.q_a_layernorm, self.q_b_proj = q_a_proj, q_a_layernorm, q_b_proj
        else:
            self.q_proj = q_proj
        self.kv_a_proj_with_mqa, self.kv_a_layernorm, self.kv_b_proj = kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
        self.o_proj = o_proj
        self.num_heads, self.nope_dim, self.rope_dim = num_heads, qk_nope_head_dim, qk_rope_head_dim
        self.v_dim, self.latent_dim, self.softmax_scale = v_head_dim, kv_lora_rank, softmax_scale

    def forward(self, x_BLC: torch.Tensor, cos_BLR: torch.Tensor, sin_BLR: torch.Tensor,
                mode: AttentionMode) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        H, N, R = self.num_heads, self.nope_dim, self.rope_dim
        if hasattr(self, "q_proj"):
            qr_BLQ = x_BLC  # no query latent: the indexer reads the attention's input
            q_BLHD = self.q_proj(x_BLC).view(B, L, H, N + R)
        else:
            qr_BLQ = self.q_a_layernorm(self.q_a_proj(x_BLC))
            q_BLHD = self.q_b_proj(qr_BLQ).view(B, L, H, N + R)
        q_nope_BLHN, q_rope_BLHR = q_BLHD.split([N, R], dim=-1)  # split, not slices: its backward is one cat
        q_rope_BLHR = rope_interleaved(q_rope_BLHR, cos_BLR[:, :, None], sin_BLR[:, :, None])
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
        self._set_stats(stats)
        return self.o_proj(out_BLHV.reshape(B, L, H * self.v_dim))

    def _dense(self, q_nope_BLHN, q_rope_BLHR, latent_BSA, k_rope_BSR, mode, indexer_out):
        """Queries [B, L, ...] (the rank's), keys [B, S, ...] (the whole sequence); S = L without context
        parallelism. Per-head keys and values come from the latent here, never from another rank."""
        B, L, H, N = q_nope_BLHN.shape
        S = latent_BSA.shape[1]
        k_nope_BSHN, v_BSHV = self.kv_b_proj(latent_BSA).view(B, S, H, N + self.v_dim).split([N, self.v_dim], -1)
        k_BSHD = torch.cat((k_nope_BSHN, k_rope_BSR[:, :, None].expand(B, S, H, self.rope_dim)), dim=-1)
        q_BLHD = torch.cat((q_nope_BLHN, q_rope_BLHR), dim=-1)
        pieces = mode.cp.chunks(S)
        out_BLHV = _by_piece(pieces, lambda lo, g, n: ops.dense_attention(
            q_BLHD[:, lo : lo + n], k_BSHD, v_BSHV, self.softmax_scale, q_offset=g))
        stats = AttentionStats()
        if indexer_out is not None:
            qi_BLGD, ki_BSD, wi_BLG = indexer_out
            kl_BL, recall_BL = _by_piece(pieces, lambda lo, g, n: ops.dense_indexer_kl(
                qi_BLGD[:, lo : lo + n], ki_BSD, wi_BLG[:, lo : lo + n], q_BLHD[:, lo : lo + n].detach(),
                k_BSHD.detach(), self.softmax_scale, mode.topk or self.indexer.topk, q_offset=g,
                index_dtype=self.indexer.index_dtype))
            stats = AttentionStats(kl_BL=kl_BL, recall_BL=recall_BL)
        return out_BLHV, stats

    def sparse_kernels(self) -> str:
        """The kernels this layer's sparse attention runs, as the dispatch point picks them for its shapes, dtype
        and device (the plan's log line)."""
        w = self.kv_b_proj.weight
        q_nope = w.new_empty(1, 1, self.num_heads, self.nope_dim)
        name = ops.sparse_mla_kernels_name(q_nope, w.new_empty(1, 1, self.latent_dim + self.rope_dim), self.latent_dim)
        return f"sparse MLA: {name}"

    def external_weights(self) -> list[nn.Parameter]:
        return [self.kv_b_proj.weight]  # sparse attention's absorbed kv_b_proj

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into W_UK [H, N, A] (absorbed into q) and W_UV [H, V, A] (applied after)."""
        w_HXA = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        w_uk_HNA, w_uv_HVA = w_HXA.split([self.nope_dim, self.v_dim], dim=1)
        return w_uk_HNA, w_uv_HVA

    def _sparse(self, q_nope_BLHN, q_rope_BLHR, kv_BLD, qi_BLGD, ki_BLD, wi_BLG, mode):
        topk_BLK = self._select(qi_BLGD, ki_BLD, wi_BLG, mode.topk or self.indexer.topk, mode.cp)
        w_uk_HNA, w_uv_HVA = self.absorbed_weights()
        return self._attend_sparse(lambda lse_BLH, probs: ops.absorbed_sparse_mla(
            q_nope_BLHN, q_rope_BLHR, kv_BLD, topk_BLK, w_uk_HNA, w_uv_HVA, self.softmax_scale, lse_BLH, probs=probs),
            qi_BLGD, ki_BLD, wi_BLG, topk_BLK, mode)


class GQAAttention(IndexedAttention):
    """Grouped-query (or multi-head) attention of the Llama layout plus a lightning indexer that reads the
    attention's input. Parameter names are the source family's (`q_proj`, `k_proj`, `v_proj`, `o_proj`, Qwen3's
    `q_norm` / `k_norm`; biases live in the projections). RoPE is rotate-half on the first R dims of each head.
    One selection per query serves all heads, as in DeepSeek's MQA form: the indexer's top-k costs the same
    whatever the group count, and the warm-up target is the attention summed over all query heads."""

    def __init__(self, *, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, o_proj: nn.Module,
                 q_norm: nn.Module | None, k_norm: nn.Module | None, indexer: Indexer, num_heads: int,
                 num_kv_heads: int, head_dim: int, rope_dim: int, softmax_scale: float):
        super().__init__(indexer)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        if q_norm is not None:
            self.q_norm, self.k_norm = q_norm, k_norm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_dim, self.softmax_scale = rope_dim, softmax_scale

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        R = self.rope_dim
        if R == x.shape[-1]:
            return rope_non_interleaved(x, cos, sin)
        x_rot, x_pass = x.split([R, x.shape[-1] - R], dim=-1)
        return torch.cat((rope_non_interleaved(x_rot, cos, sin), x_pass), dim=-1)

    def project(self, x_BLC: torch.Tensor, cos_BLR: torch.Tensor, sin_BLR: torch.Tensor):
        """The attention's queries [B, L, H, D], keys and values [B, L, J, D], RoPE applied."""
        B, L, _ = x_BLC.shape
        H, J, D = self.num_heads, self.num_kv_heads, self.head_dim
        q_BLHD = self.q_proj(x_BLC).view(B, L, H, D)
        k_BLJD = self.k_proj(x_BLC).view(B, L, J, D)
        v_BLJD = self.v_proj(x_BLC).view(B, L, J, D)
        if hasattr(self, "q_norm"):
            q_BLHD, k_BLJD = self.q_norm(q_BLHD), self.k_norm(k_BLJD)
        q_BLHD = self._rope(q_BLHD, cos_BLR[:, :, None], sin_BLR[:, :, None])
        k_BLJD = self._rope(k_BLJD, cos_BLR[:, :, None], sin_BLR[:, :, None])
        return q_BLHD, k_BLJD, v_BLJD

    def forward(self, x_BLC: torch.Tensor, cos_BLR: torch.Tensor, sin_BLR: torch.Tensor,
                mode: AttentionMode) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        H, J, D = self.num_heads, self.num_kv_heads, self.head_dim
        q_BLHD, k_BLJD, v_BLJD = self.project(x_BLC, cos_BLR, sin_BLR)
        if mode.sparse or mode.indexer_loss:
            qi_BLGD, ki_BLD, wi_BLG = self.indexer(x_BLC.detach(), x_BLC.detach(), cos_BLR, sin_BLR)
            ki_BLD = mode.cp.gather(ki_BLD)
        k_BSJD, v_BSJD = k_BLJD, v_BLJD
        if mode.cp.size > 1:  # the whole sequence's keys and values: one gather
            k_BSJD, v_BSJD = mode.cp.gather(torch.cat((k_BLJD, v_BLJD), dim=-1).flatten(2)).unflatten(
                -1, (J, 2 * D)).split([D, D], dim=-1)
        if mode.sparse:
            topk_BLK = self._select(qi_BLGD, ki_BLD, wi_BLG, mode.topk or self.indexer.topk, mode.cp)
            out_BLHD, stats = self._attend_sparse(lambda lse_BLH, probs: ops.sparse_gqa(
                q_BLHD, k_BSJD, v_BSJD, topk_BLK, self.softmax_scale, lse_BLH, probs=probs),
                qi_BLGD, ki_BLD, wi_BLG, topk_BLK, mode)
        else:
            pieces = mode.cp.chunks(k_BSJD.shape[1])
            out_BLHD = _by_piece(pieces, lambda lo, g, n: ops.dense_attention(
                q_BLHD[:, lo : lo + n], k_BSJD, v_BSJD, self.softmax_scale, q_offset=g))
            stats = AttentionStats()
            if mode.indexer_loss:
                kl_BL, recall_BL = _by_piece(pieces, lambda lo, g, n: ops.dense_indexer_kl(
                    qi_BLGD[:, lo : lo + n], ki_BLD, wi_BLG[:, lo : lo + n], q_BLHD[:, lo : lo + n].detach(),
                    k_BSJD.detach(), self.softmax_scale, mode.topk or self.indexer.topk, q_offset=g,
                    index_dtype=self.indexer.index_dtype))
                stats = AttentionStats(kl_BL=kl_BL, recall_BL=recall_BL)
        self._set_stats(stats)
        return self.o_proj(out_BLHD.reshape(B, L, H * D))

    def sparse_kernels(self) -> str:
        w = self.q_proj.weight
        q = w.new_empty(1, 1, self.num_heads, self.head_dim)
        kv = w.new_empty(1, 1, self.num_kv_heads, self.head_dim)
        return f"sparse GQA: {ops.sparse_gqa_kernels_name(q, kv, kv)}"


def _by_piece(pieces: list[tuple[int, int, int]], fn):
    """fn(local start, global start, length) for each piece of the rank's queries, joined along the sequence
    (outputs may be tensors or tuples of them); one piece: its output as it is."""
    outs = [fn(*piece) for piece in pieces]
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*outs))
    return torch.cat(outs, dim=1)

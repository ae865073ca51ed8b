"""The three stages as data: which parameters train, which attention mode runs, which losses apply.

base:   dense LM pre-training of the source model (the embedded default's `make base`); indexers unused.
warmup: backbone frozen and forward-only, attention dense, indexer KL over the full span.
sparse: top-k attention, LM loss for the model, KL over the selected set for the
        indexers (whose inputs are detached, so each loss reaches only its own parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from train import metrics as M
from train.model import AttentionMode, DSAForCausalLM


@dataclass(frozen=True)
class Stage:
    name: str
    trains_backbone: bool
    trains_indexer: bool
    sparse: bool
    lm_loss: bool
    indexer_loss: bool


STAGES = {
    "base": Stage("base", trains_backbone=True, trains_indexer=False, sparse=False, lm_loss=True, indexer_loss=False),
    "warmup": Stage("warmup", trains_backbone=False, trains_indexer=True, sparse=False, lm_loss=False,
                    indexer_loss=True),
    "sparse": Stage("sparse", trains_backbone=True, trains_indexer=True, sparse=True, lm_loss=True, indexer_loss=True),
}


@dataclass
class StageConfig:
    """How a stage trains. Its size (steps, global_batch, lr) has one home: the preset (conf/preset/)."""

    name: str = "warmup"
    steps: int = MISSING
    max_tokens: int | None = None      # stop once this many tokens (all ranks) were trained on
    global_batch: int = MISSING        # sequences per optimizer step, over all ranks
    micro_batch: int = 1               # sequences per rank per forward
    lr: float = MISSING
    indexer_lr: float | None = None    # sparse stage: the indexer's own lr (null: stage.lr)
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 1.0          # cosine decay to lr * min_lr_ratio (1.0: constant)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    indexer_loss_coef: float = 1.0     # sparse stage: loss = lm + coef * indexer_kl (the KL's gradient only
                                       # reaches the indexer, so with Adam the coefficient barely matters)
    init_from: str | None = None       # checkpoint directory this stage starts from (overrides model.path)
    log_every: int = 1
    eval_every: int = 0                # held-out figures (eval/*) every this many steps and at the end; 0: off
    eval_sequences: int = 8            # held-out sequences per evaluation (data.held_out), over all ranks
    save_every: int = 100
    keep_last: int = 2                 # checkpoints kept on disk (older ones are deleted after a good save)
    activation_checkpointing: bool = False
    recompute_topk: bool = False       # with checkpointing: recompute each layer's top-k in backward instead of
                                       # keeping it (saves L x topk x 4 bytes per layer; one more indexer pass)
    on_nonfinite: str = "stop"         # a NaN/inf loss term or gradient norm: stop (exit 3) or skip the update
    max_skipped_steps: int = 16        # on_nonfinite=skip: stop once this many consecutive steps were skipped


def mode_of(stage: Stage) -> AttentionMode:
    return AttentionMode(sparse=stage.sparse, indexer_loss=stage.indexer_loss)


def set_trainable(model: DSAForCausalLM, stage: Stage) -> None:
    indexer_ids = {id(p) for p in model.indexer_parameters()}
    for p in model.parameters():
        p.requires_grad_(stage.trains_indexer if id(p) in indexer_ids else stage.trains_backbone)


def param_groups(model: DSAForCausalLM, stage: Stage, cfg: StageConfig) -> list[dict]:
    """Optimizer groups holding exactly the trainable parameters (frozen ones get no state)."""
    set_trainable(model, stage)
    indexer_ids = {id(p) for p in model.indexer_parameters()}
    groups = []
    if stage.trains_backbone:
        groups.append({"params": [p for p in model.parameters() if id(p) not in indexer_ids], "lr": cfg.lr,
                       "name": "backbone"})
    if stage.trains_indexer:
        groups.append({"params": model.indexer_parameters(), "lr": cfg.indexer_lr or cfg.lr, "name": "indexer"})
    return groups


def compute_loss(model: DSAForCausalLM, stage: Stage, cfg: StageConfig, input_ids: torch.Tensor,
                 labels: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss to backpropagate, detached per-micro-batch metrics). Losses are means over tokens (and layers).
    Under context parallelism each rank's loss and metrics are its share: they add up over the group to the
    sequence's (DeepSpeed sums the group's gradients), so no token counts twice.

    Under activation checkpointing the sparse stage's indexer KL is computed in backward (the forward skips the
    attention probabilities, its target): the loss's value then holds the LM term only, and the metrics lack the
    KL and the total until `settle_metrics` after the backward. Call it after every backward.

    `forward` runs `model`'s forward: the DeepSpeed engine in training (default: the model itself)."""
    forward = forward or model
    mode = mode_of(stage)
    metrics: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=input_ids.device)
    if stage.lm_loss:
        lm_sum, count = forward(input_ids, mode, labels_BL=labels)
        lm = lm_sum / model.context_parallel.sum(count)
        loss = loss + lm
        metrics[M.LM_LOSS] = lm.detach()
    else:
        forward(input_ids, mode, head=False)  # the warm-up needs no LM head
    if stage.indexer_loss:
        loss = loss + _indexer_coef(stage, cfg) * _kl_layers(model).mean()
    if not any(s.kl_in_backward for s in model.layer_stats()):
        _add_indexer_metrics(model, stage, cfg, metrics)
    return loss, metrics


def settle_metrics(model: DSAForCausalLM, stage: Stage, cfg: StageConfig,
                   metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`compute_loss`'s metrics once the loss's backward has run: the indexer KL and the total added where the
    KL was computed in backward (unchanged otherwise)."""
    if M.TOTAL_LOSS not in metrics:
        _add_indexer_metrics(model, stage, cfg, metrics)
    return metrics


def _indexer_coef(stage: Stage, cfg: StageConfig) -> float:
    return cfg.indexer_loss_coef if stage.lm_loss else 1.0


def _kl_layers(model: DSAForCausalLM) -> torch.Tensor:
    cp = model.context_parallel
    return torch.stack([cp.token_mean(s.kl_BL.float()) for s in model.layer_stats()])


def _add_indexer_metrics(model: DSAForCausalLM, stage: Stage, cfg: StageConfig,
                         metrics: dict[str, torch.Tensor]) -> None:
    """The indexer's metrics, from the layers' stats, and the total loss into `metrics`."""
    terms = [metrics[M.LM_LOSS]] if M.LM_LOSS in metrics else []
    if stage.indexer_loss:
        cp = model.context_parallel
        stats = model.layer_stats()
        with torch.no_grad():
            kl_layers = _kl_layers(model)
            kl = kl_layers.mean()
            terms.append(_indexer_coef(stage, cfg) * kl)
            recalls = [cp.token_mean(s.recall_BL.float()) for s in stats if s.recall_BL is not None]
        metrics[M.INDEXER_KL] = kl
        for i, v in enumerate(kl_layers):
            metrics[M.per_layer(M.LAYER_KL, i)] = v
        if recalls:
            metrics[M.RECALL] = torch.stack(recalls).mean()
            for i, v in enumerate(recalls):
                metrics[M.per_layer(M.RECALL, i)] = v
    metrics[M.TOTAL_LOSS] = sum(terms)


@torch.no_grad()
def alignment_probe(model: DSAForCausalLM, stage: Stage, probe_ids: torch.Tensor,
                    previous_topk: list[torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Logging-step figures on a fixed probe batch: the selected sets of 64 query positions (and their overlap
    with the previous probe's) and, in the sparse stage, the indexer's recall of the dense attention it
    replaces. Returns (metrics, the selected sets to pass as `previous_topk` next time)."""
    metrics: dict[str, torch.Tensor] = {}
    cp = model.context_parallel
    model.hidden_states(probe_ids, AttentionMode(sparse=True, keep_topk=True))
    # Overlap is measured on 64 fixed query positions: small enough to keep in checkpoints at any length.
    L = probe_ids.shape[1]
    positions = torch.linspace(0, L - 1, min(64, L), device=probe_ids.device).round().long()
    held = cp.positions(L, probe_ids.device)
    mine = torch.full((L,), len(held), device=probe_ids.device)  # global position -> the rank's row (none: M)
    mine[held] = torch.arange(len(held), device=probe_ids.device)
    topk = [_probe_rows(cp, s.topk_BLK, positions, mine) for s in model.layer_stats()]
    if previous_topk is not None:
        # the same figure on every rank of a context-parallel group: each adds its share
        overlaps = [selection_overlap(p, t) / cp.size for p, t in zip(previous_topk, topk)]
        metrics[M.OVERLAP] = torch.stack(overlaps).mean()
        for i, v in enumerate(overlaps):
            metrics[M.per_layer(M.OVERLAP, i)] = v
    if stage.sparse:  # the warm-up measures recall on every training batch already
        model.hidden_states(probe_ids, AttentionMode(sparse=False, indexer_loss=True))
        recalls = [cp.token_mean(s.recall_BL.float()) for s in model.layer_stats()]
        metrics[M.RECALL] = torch.stack(recalls).mean()
        for i, v in enumerate(recalls):
            metrics[M.per_layer(M.RECALL, i)] = v
    return metrics, topk


def _probe_rows(cp, topk_BLK: torch.Tensor, positions: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """The selections of `positions` (global) as int32 [B, P, K], on every rank of a context-parallel group: each
    rank adds the rows it computed (stored + 1, so that -1 adds 0) and the group sums them."""
    if cp.size == 1:
        return topk_BLK[:, positions].to(torch.int32)
    M = topk_BLK.shape[1]
    local = mine[positions]  # the rank's row of each position where it holds it (rows 0..M-1), else >= M
    here = local < M
    rows = torch.zeros(topk_BLK.shape[0], len(positions), topk_BLK.shape[2], dtype=torch.int32,
                       device=topk_BLK.device)
    rows[:, here] = topk_BLK[:, local[here]].to(torch.int32) + 1
    return cp.sum(rows) - 1


def selection_overlap(prev_BLK: torch.Tensor, now_BLK: torch.Tensor) -> torch.Tensor:
    """Mean over queries of |S_prev ∩ S_now| / |S_now| (selected sets as index lists, -1 = none)."""
    prev_sorted = prev_BLK.sort(dim=-1).values
    pos = torch.searchsorted(prev_sorted, now_BLK).clamp(max=prev_BLK.shape[-1] - 1)
    hit = (prev_sorted.gather(-1, pos) == now_BLK) & (now_BLK >= 0)
    return (hit.sum(-1).float() / (now_BLK >= 0).sum(-1).clamp(min=1)).mean()

"""Context parallelism: one sequence split over the ranks of a process group.

Each rank keeps its own queries and gathers the keys. MLA's keys are shared latents (its latent and rope key,
the indexer's key: 512 + 64 + 128 values a token at DeepSeek-V3's shape), so a rank all-gathers those, never
per-head keys or values; a GQA model's are its key heads' keys and values (2 x 8 x 128 values a token at
Qwen3-32B's shape) and the indexer's key. The backward reduce-scatters their gradients. Top-k selection and sparse attention then
work on global positions in the gathered latent.

The split is zig-zag: the sequence is cut into 2 x size equal chunks and rank r holds chunks r and
2 x size - 1 - r, so that every rank's queries see about as many keys under the causal mask (the dense warm-up
attention and the indexer logits grow with position; sparse attention costs k keys wherever a query sits).

The model takes whole sequences (every rank of a group reads the same ones) and keeps its rank's tokens
(`shard`). Model code takes the group and its collectives from here and never imports DeepSpeed or
torch.distributed (train/engine.py hands them in).

Dimension legend: B batch, L sequence (whole), M the rank's tokens (L / size), D features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel group of this rank (`group` None and size 1: no split). `comm` runs the collectives on
    the group (train/engine.py: GroupCollectives): the model itself never imports torch.distributed."""

    group: object = None
    rank: int = 0
    size: int = 1
    comm: object = None

    def chunks(self, L: int) -> list[tuple[int, int, int]]:
        """(local start, global start, length) of the rank's pieces of a length-L sequence, in local order."""
        if self.size == 1:
            return [(0, 0, L)]
        if L % (2 * self.size):
            raise ValueError(f"sequence length {L} does not split into 2 x {self.size} context-parallel chunks")
        n = L // (2 * self.size)
        return [(0, self.rank * n, n), (n, (2 * self.size - 1 - self.rank) * n, n)]

    def positions(self, L: int, device) -> torch.Tensor:
        """Global positions of the rank's tokens, [M]."""
        return torch.cat([torch.arange(g, g + n, device=device) for _, g, n in self.chunks(L)])

    def shard(self, x_BL: torch.Tensor) -> torch.Tensor:
        """The rank's tokens of whole sequences (dim 1)."""
        if self.size == 1:
            return x_BL
        return torch.cat([x_BL[:, g : g + n] for _, g, n in self.chunks(x_BL.shape[1])], dim=1)

    def gather(self, x_BMD: torch.Tensor) -> torch.Tensor:
        """Whole sequences [B, L, D] from every rank's tokens, in global order; the backward reduce-scatters."""
        if self.size == 1:
            return x_BMD
        return _Gather.apply(x_BMD, self)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group (no gradient flows through it: counts, metrics)."""
        if self.size == 1:
            return x
        x = x.detach().clone()
        self.comm.all_reduce(x, group=self.group)
        return x

    def token_mean(self, x_BM: torch.Tensor) -> torch.Tensor:
        """This rank's share of the mean over all tokens of the group: sum here / all tokens, so that the shares
        of the group add up to the mean (every rank holds the same number of tokens). Size 1: the mean."""
        if self.size == 1:
            return x_BM.mean()
        return x_BM.sum() / (x_BM.numel() * self.size)


def _to_global(parts_PBMD: torch.Tensor, cp: ContextParallel, L: int) -> torch.Tensor:
    """Rank-major pieces [size, B, M, D] -> [B, L, D] in global order."""
    out = parts_PBMD.new_empty(parts_PBMD.shape[1], L, *parts_PBMD.shape[3:])
    for r in range(cp.size):
        for lo, g, n in ContextParallel(rank=r, size=cp.size).chunks(L):
            out[:, g : g + n] = parts_PBMD[r, :, lo : lo + n]
    return out


def _gather(x_BMD: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    x_BMD = x_BMD.contiguous()
    parts = x_BMD.new_empty(cp.size * x_BMD.shape[0], *x_BMD.shape[1:])  # rank-major along dim 0
    cp.comm.all_gather(parts, x_BMD, group=cp.group)
    return _to_global(parts.view(cp.size, *x_BMD.shape), cp, x_BMD.shape[1] * cp.size)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BMD, cp):
        ctx.cp = cp
        return _gather(x_BMD, cp)

    @staticmethod
    def backward(ctx, grad_BLD):
        cp = ctx.cp
        parts = torch.cat([ContextParallel(rank=r, size=cp.size).shard(grad_BLD) for r in range(cp.size)])
        out = grad_BLD.new_empty(grad_BLD.shape[0], grad_BLD.shape[1] // cp.size, *grad_BLD.shape[2:])
        cp.comm.reduce_scatter(out, parts.contiguous(), group=cp.group)
        return out, None

"""The lightning indexer of one layer: projections that score which past tokens a query needs.

Dimension legend: B batch, L sequence, C hidden size, Q q_lora_rank, G indexer heads, D indexer head dim,
R rope dims (the first R of D).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_non_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE: pairs (i, i + R/2). cos/sin are [B, L, R] laid out as cat(f, f)."""
    return x * cos + rotate_half(x) * sin


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved RoPE: pairs (2i, 2i+1), output de-interleaved as [evens' | odds'] (as MLA does)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # not strided slices: the backward is one stack
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Indexer(nn.Module):
    """Per-layer indexer; parameter names are the checkpoint keys under `self_attn.indexer.`.

    Initialisation (a fresh indexer on a dense checkpoint): `wq_b`, `wk`, `weights_proj` ~ N(0, init_std)
    with the source model's `initializer_range`, LayerNorm weight 1 and bias 0. Logits then start at O(1)
    scale: k is LayerNorm-ed, q comes from MLA's RMS-normed query latent.
    """

    def __init__(self, hidden_size: int, q_lora_rank: int, num_heads: int, head_dim: int, rope_dim: int,
                 topk: int = 2048, init_std: float = 0.02, index_dtype: str = "auto"):
        super().__init__()
        if rope_dim > head_dim:
            raise ValueError(f"index_head_dim={head_dim} must be >= qk_rope_head_dim={rope_dim}")
        self.num_heads, self.head_dim, self.rope_dim = num_heads, head_dim, rope_dim
        self.topk = topk  # tokens each query keeps in sparse mode (`index_topk`)
        self.index_dtype = index_dtype  # the top-k's logits: fp8, bf16 or auto (`ops.index_fp8`); not a weight
        self.wq_b = nn.Linear(q_lora_rank, num_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for lin in (self.wq_b, self.wk, self.weights_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=self.init_std, generator=generator)
        nn.init.ones_(self.k_norm.weight)
        nn.init.zeros_(self.k_norm.bias)

    def forward(
        self, x_BLC: torch.Tensor, qr_BLQ: torch.Tensor, cos_BLR: torch.Tensor, sin_BLR: torch.Tensor,
        interleaved: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns q [B, L, G, D], k [B, L, D] (RoPE applied to the first R dims) and w [B, L, G] in fp32.

        w carries both G**-0.5 and D**-0.5, so that I[t, s] = sum_g w[t, g] * relu(q[t, g] . k[s]).
        `interleaved=True` exists only so a test can show the layout matters; the indexer's is non-interleaved.
        """
        B, L, _ = x_BLC.shape
        G, D, R = self.num_heads, self.head_dim, self.rope_dim
        rope = rope_interleaved if interleaved else rope_non_interleaved
        q_BLGD = self.wq_b(qr_BLQ).view(B, L, G, D)
        q_rot_BLGR, q_pass_BLGX = q_BLGD.split([R, D - R], dim=-1)  # split, not slices: its backward is one cat
        q_BLGD = torch.cat((rope(q_rot_BLGR, cos_BLR[:, :, None], sin_BLR[:, :, None]), q_pass_BLGX), -1)
        k_rot_BLR, k_pass_BLX = self.k_norm(self.wk(x_BLC)).split([R, D - R], dim=-1)
        k_BLD = torch.cat((rope(k_rot_BLR, cos_BLR, sin_BLR), k_pass_BLX), dim=-1)
        w_BLG = self.weights_proj(x_BLC).float() * (G**-0.5 * D**-0.5)
        return q_BLGD, k_BLD, w_BLG

"""Shared fixtures: tiny DeepSeek-V3 architectures (random weights, CPU, fp32).

Without a GPU, Triton kernels run in Triton's interpreter (set here, before any kernel is defined).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A tiny MLA + MoE architecture: 3 layers, the first with a dense MLP, the rest MoE.
TINY_ARCH = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
    n_group=2, topk_group=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16,
    qk_nope_head_dim=16, first_k_dense_replace=1, max_position_embeddings=1024,
)
TINY_INDEX = dict(index_n_heads=4, index_head_dim=16, index_topk=8)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Moves every parameter and buffer off its tidy init (norms of 1, zero router bias) so parity is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if "e_score_correction_bias" in n]
    with torch.no_grad():
        for t in tensors:
            t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype) * (t.abs().mean() + 1e-3))


@pytest.fixture
def tiny_arch():
    return dict(TINY_ARCH)

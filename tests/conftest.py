"""Shared fixtures: tiny DeepSeek-V3 architectures (random weights, CPU, fp32).

Without a GPU, Triton kernels run in Triton's interpreter (set here, before any kernel is defined).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny architectures of every supported family: the one place tests take model shapes from (`tiny`). The default
# is a tiny MLA + MoE DeepSeek-V3: 3 layers, the first with a dense MLP, the rest MoE.
_COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=1024)
_MOE = dict(moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
            first_k_dense_replace=1)
TINY = {
    "deepseek_v3": dict(_COMMON, **_MOE, num_key_value_heads=4, n_group=2, topk_group=1, kv_lora_rank=32,
                        q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16),
    # DeepSeek-V2-Lite's layout: MLA without a query latent
    "deepseek_v2": dict(_COMMON, **_MOE, num_key_value_heads=4, n_group=1, topk_group=1, q_lora_rank=None,
                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16),
    # Qwen3: per-head q/k RMSNorm, an explicit head_dim, GQA 4 -> 2
    "qwen3": dict(_COMMON, num_key_value_heads=2, head_dim=16),
    # Llama 3: its rope scaling, MQA (one key head)
    "llama": dict(_COMMON, num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    # Qwen2: q/k/v biases, MHA, tied embeddings
    "qwen2": dict(_COMMON, num_key_value_heads=4, tie_word_embeddings=True),
    "mistral": dict(_COMMON, num_key_value_heads=2, sliding_window=None),
}


def tiny(family: str = "deepseek_v3", **overrides) -> dict:
    """A tiny architecture of `family` (`model.arch` form: its `model_type` included), with `overrides`."""
    return {"model_type": family, **TINY[family], **overrides}


def tiny_source(arch: dict, seed: int = 0):
    """The transformers model of a `tiny` architecture (eager attention, random weights moved off their init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(arch)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(fields.pop("model_type", "deepseek_v3"), **fields, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    perturb_(model, seed)
    return model


# The default family without its model_type (DeepseekV3Config's own fields), as older tests take it
TINY_ARCH = TINY["deepseek_v3"]
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

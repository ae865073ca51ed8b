"""`make plan`'s figures for a small config, checked against sums written out by hand."""

from tests.unit.test_config import _cfg
from train.plan import make_plan

ARCH = dict(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            first_k_dense_replace=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
            kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=4,
            n_group=1, topk_group=1, num_experts_per_tok=2, tie_word_embeddings=False)


def _plan(stage, world=2, **over):
    arch = ARCH | over
    overrides = [f"stage={stage}", "run.dry_run=true", "model.path=null", "data.seq_len=64", "model.index_topk=8",
                 "model.index_n_heads=2", "model.index_head_dim=4", "stage.global_batch=4", "stage.steps=10",
                 "deepspeed.bf16=true"]
    cfg = _cfg(*overrides)
    cfg.model.arch = arch
    return make_plan(cfg, world)


def test_dense_mlp_counts_memory_and_flops_by_hand():
    C, Q, H, N, R, V, A, I, E, G, D = 32, 16, 2, 4, 2, 4, 8, 64, 100, 2, 4
    per_layer = (C * Q + Q + Q * H * (N + R) + C * (A + R) + A + A * H * (N + V) + H * V * C  # attention
                 + 3 * C * I + 2 * C)                                                          # MLP, 2 norms
    backbone = 2 * per_layer + E * C + C + E * C
    indexer = 2 * (G * D * Q + D * C + 2 * D + G * C)
    plan = _plan("warmup")
    p = plan["parameters"]
    assert (p["backbone"], p["indexer"], p["total"]) == (backbone, indexer, backbone + indexer)
    assert plan["trainable_parameters"] == indexer
    assert plan["tokens_per_step"] == 4 * 64 and plan["tokens_in_stage"] == 10 * 4 * 64
    assert plan["gradient_accumulation"] == 2
    total = backbone + indexer
    assert plan["memory_per_gpu_bytes"]["zero0"] == {"weights": 2 * total, "gradients": 2 * indexer,
                                                     "optimizer": 12 * indexer}
    assert plan["memory_per_gpu_bytes"]["zero3"] == {"weights": total, "gradients": indexer,
                                                     "optimizer": 6 * indexer}
    # matmul weights of both layers and the LM head; the attention's two small norms (Q + A) count with it
    active = 2 * (C * Q + Q * H * (N + R) + C * (A + R) + A * H * (N + V) + H * V * C + 3 * C * I) + E * C
    assert p["active_matmul"] == active + 2 * (Q + A)
    half = (64 + 1) / 2
    f = plan["flops_per_token"]
    matmul, dense_attn = 2 * p["active_matmul"], 2 * 2 * H * (N + R + V) * half
    idx = 2 * 2 * (Q * G * D + C * D + C * G) + 2 * 2 * G * D * half
    assert f["warmup"] == matmul + dense_attn + 3 * idx + 2 * 2 * H * (N + R) * half


def test_moe_active_parameters_count_routed_experts_per_token():
    dense = _plan("sparse", first_k_dense_replace=2)["parameters"]
    moe = _plan("sparse", first_k_dense_replace=1)["parameters"]
    C, I_moe, E_r, k = 32, 16, 4, 2
    expert = 3 * C * I_moe
    # layer 1 turns from a dense MLP (3*C*64) into shared expert + 4 routed experts + a router
    assert moe["backbone"] - dense["backbone"] == (expert + E_r * expert + E_r * C) - 3 * C * 64
    assert moe["active_matmul"] - dense["active_matmul"] == (expert + k * expert + E_r * C) - 3 * C * 64

"""`make plan`'s figures for a small config, checked against sums written out by hand."""

from tests.unit.test_config import _cfg
from train.plan import make_plan

ARCH = dict(model_type="deepseek_v3", vocab_size=100, hidden_size=32, intermediate_size=64,
            moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
            kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=4,
            n_group=1, topk_group=1, num_experts_per_tok=2, tie_word_embeddings=False)


def _plan(stage, world=2, extra=(), arch=None, **over):
    arch = (arch or ARCH) | over
    overrides = [f"stage={stage}", "run.dry_run=true", "model.path=null", "data.seq_len=64", "model.index_topk=8",
                 "model.index_n_heads=2", "model.index_head_dim=4", "stage.global_batch=4", "stage.steps=10",
                 "deepspeed.bf16=true", *extra]
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


def _activations(stage, cp):
    return _plan(stage, world=4, extra=[f"deepspeed.context_parallel={cp}"])["activation_bytes_per_gpu"][stage]


def test_activation_memory_per_gpu_by_hand():
    """Checkpointed layer inputs, kept top-k and lse, one layer's working set, the LM head chunk: bytes per GPU for
    the rank's M = L / CP query tokens and S = L gathered key tokens (A latent, R rope, D indexer dims)."""
    C, H, N, R, V, A, I, E, G, D, K, S = 32, 2, 4, 2, 4, 8, 64, 100, 2, 4, 8, 64
    for cp in (1, 2, 4):
        M = S // cp
        common = 2 * M * H * (N + R + V) * 2 + 2 * S * (A + R + D) * 2 + 2 * M * G * D * 2 + 4 * M * I * 2
        sparse = _activations("sparse", cp)
        assert sparse == {"layer_inputs": 2 * M * C * 2, "kept_per_layer": 2 * M * (K * 4 + H * 4),
                          "layer_working_set": common + 3 * M * H * (A + R) * 2 + M * K * 4,
                          "lm_head_chunk": 2 * 4096 * E * 4, "total": sum(v for k, v in sparse.items() if k != "total")}
        warm = _activations("warmup", cp)
        assert warm["kept_per_layer"] == 0
        assert warm["layer_working_set"] == common + S * H * (2 * N + R + V) * 2
        base = _activations("base", cp)
        assert base["layer_working_set"] == common + 2 * S * H * (2 * N + R + V) * 2
    recompute = _plan("sparse", extra=["stage.recompute_topk=true"])["activation_bytes_per_gpu"]["sparse"]
    assert recompute["kept_per_layer"] == 2 * S * H * 4  # the lse only


def test_smallest_fit_is_the_fewest_gpus_then_the_smallest_context_parallel_degree():
    """On a GPU too small for the stage on one GPU, the plan finds the fewest GPUs (ZeRO-3) and for them the
    smallest context-parallel degree whose per-GPU total stays within 90% of the memory."""
    from train.plan import activation_bytes, memory_per_gpu

    plan = _plan("sparse", world=1)
    index = plan["index"]
    cfg_args = dict(stage="sparse", seq_len=64, micro_batch=1, topk=8, index_head_dim=4, index_n_heads=2)

    def total(gpus, cp):
        states = sum(memory_per_gpu(plan["parameters"]["total"], plan["trainable_parameters"], gpus, 3, True).values())
        act = activation_bytes(ARCH, cfg_args["stage"], 64, 1, cp, index["index_topk"], 4, 2)["total"]
        return states + act
    # a memory between what 2 GPUs at CP=2 and 2 GPUs at CP=1 need: 2 GPUs with CP=2 is the answer
    memory = (total(2, 2) + total(2, 1)) / 2 / 0.9
    assert total(1, 1) > 0.9 * memory and total(2, 2) <= 0.9 * memory < total(2, 1)
    fit = _plan("sparse", world=1, extra=[f"run.plan_gpu_memory_gb={memory / 1e9}"])["smallest_fit"]["sparse"]
    assert (fit["gpus"], fit["context_parallel"]) == (2, 2)
    assert fit["states"] + fit["activations"] == total(2, 2)


def test_gqa_counts_and_flops_by_hand():
    """A Llama-shaped GQA model: the indexer reads the hidden state (no query latent), attention FLOPs use the head
    dim for keys and values, and sparse attention is 2 H (D + D) K."""
    C, H, J, Dh, I, E, G, D, L, K = 32, 4, 2, 8, 64, 100, 2, 4, 64, 8
    gqa = dict(model_type="llama", vocab_size=E, hidden_size=C, intermediate_size=I, num_hidden_layers=2,
               num_attention_heads=H, num_key_value_heads=J, head_dim=Dh, tie_word_embeddings=False)
    plan = _plan("sparse", arch=gqa)
    p = plan["parameters"]
    per_layer = C * H * Dh + 2 * C * J * Dh + H * Dh * C + 3 * C * I + 2 * C
    assert p["backbone"] == 2 * per_layer + E * C + C + E * C
    assert p["indexer"] == 2 * (G * D * C + D * C + 2 * D + G * C)
    matmul = 2 * p["active_matmul"]
    sparse_attn = 2 * 2 * H * (Dh + Dh) * K
    idx_proj, idx_score = 2 * 2 * (C * G * D + C * D + C * G), 2 * 2 * G * D * (L + 1) / 2
    f = plan["flops_per_token"]
    assert f["sparse"] == 3 * (matmul + sparse_attn) + idx_score + 3 * (idx_proj + 2 * 2 * G * D * K)
    assert f["base"] == 3 * (matmul + 2 * 2 * H * (Dh + Dh) * (L + 1) / 2)
    assert plan["activation_bytes_per_gpu"]["sparse"]["kept_per_layer"] == 2 * 64 * (K * 4 + H * 4)

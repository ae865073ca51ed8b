"""`make plan`: what a stage costs before it runs; no weights are allocated (shapes come from a meta model).

Parameters, tokens per step and per stage, steps, gradient accumulation, per-GPU memory of weights,
gradients and optimizer state under ZeRO 0-3, and training FLOPs per token of each stage.

FLOPs per token (multiply-adds x 2), for sequence length L, top-k K, per layer unless noted:
- matmuls: 2 x active parameters (MoE: shared + routed experts per token; the LM head; no embedding).
- dense causal attention, per-head MLA form: 2 H (d_qk + d_v) (L+1)/2.
- sparse attention, absorbed MQA form: 2 H (A + R + A) K (A = kv_lora_rank, R = rope dims), plus the
  absorption matmuls 2 H N A + 2 H A V.
- indexer: projections 2 (Q G D + C D + C G), scoring 2 G D (L+1)/2 over the causal span.
Warm-up = backbone forward (dense) + indexer forward and backward (x3) + the recomputed attention target
2 H d_qk (L+1)/2. Sparse = 3 x backbone with sparse attention (forward + backward ~ 2x) + the indexer's
top-k scoring forward + its selected-set KL (3 x 2 G D K) and projections (x3). Base = 3 x dense backbone.
"""

from __future__ import annotations

from train.engine import ZERO_STAGES, use_bf16


def count_parameters(config: dict, index_n_heads: int, index_head_dim: int) -> dict:
    from train.model.hf import meta_model

    meta = meta_model(config)
    C, Q = config["hidden_size"], config["q_lora_rank"]
    G, D = index_n_heads, index_head_dim
    L = config["num_hidden_layers"]
    indexer = L * (G * D * Q + D * C + 2 * D + G * C)
    total = sum(p.numel() for p in meta.parameters())
    active = 0
    for layer in meta.model.layers:
        active += sum(p.numel() for p in layer.self_attn.parameters())
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            per_expert = sum(p.numel() for p in mlp.experts.parameters()) // config["n_routed_experts"]
            active += per_expert * config["num_experts_per_tok"]
            active += sum(p.numel() for p in mlp.shared_experts.parameters()) + mlp.gate.weight.numel()
        else:
            active += sum(p.numel() for p in mlp.parameters())
    active += meta.lm_head.weight.numel()
    return {"backbone": total, "indexer": indexer, "total": total + indexer, "active_matmul": active}


def flops_per_token(config: dict, params: dict, seq_len: int, topk: int, index_n_heads: int,
                    index_head_dim: int) -> dict:
    H, L = config["num_attention_heads"], config["num_hidden_layers"]
    N, R, V = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    A, Q, C = config["kv_lora_rank"], config["q_lora_rank"], config["hidden_size"]
    G, D = index_n_heads, index_head_dim
    half_span = (seq_len + 1) / 2
    K = min(topk, seq_len)
    matmul = 2 * params["active_matmul"]
    dense_attn = L * 2 * H * (N + R + V) * half_span
    sparse_attn = L * (2 * H * (A + R + A) * K + 2 * H * N * A + 2 * H * A * V)
    idx_proj = L * 2 * (Q * G * D + C * D + C * G)
    idx_score = L * 2 * G * D * half_span
    target = L * 2 * H * (N + R) * half_span
    return {
        "base": 3 * (matmul + dense_attn),
        "warmup": matmul + dense_attn + 3 * (idx_proj + idx_score) + target,
        "sparse": 3 * (matmul + sparse_attn) + idx_score + 3 * (idx_proj + L * 2 * G * D * K),
    }


def memory_per_gpu(total: int, trainable: int, world: int, zero: int, bf16: bool) -> dict:
    """Bytes per GPU: weights (bf16 or fp32), gradients, optimizer (fp32 master copy when bf16, Adam m and v)."""
    w_bytes = 2 if bf16 else 4
    opt_bytes = 12 if bf16 else 8
    return {
        "weights": w_bytes * total / (world if zero >= 3 else 1),
        "gradients": w_bytes * trainable / (world if zero >= 2 else 1),
        "optimizer": opt_bytes * trainable / (world if zero >= 1 else 1),
    }


def make_plan(cfg, world: int) -> dict:
    from train.model.surgery import index_config

    from train.model.hf import source_config

    # a plan reads shapes only: the architecture when the config has one, else the checkpoint's config.json
    config = source_config(None if cfg.model.arch else cfg.model_path(), cfg.model.arch)
    index = index_config(config, cfg.model)
    G, D = index["index_n_heads"], index["index_head_dim"]
    params = count_parameters(config, G, D)
    stage = cfg.stage
    trainable = {"base": params["backbone"], "warmup": params["indexer"], "sparse": params["total"]}[stage.name]
    tokens_step = cfg.tokens_per_step()
    bf16 = use_bf16(cfg.deepspeed, accelerator_present=True)  # plans are for GPUs
    return {
        "stage": stage.name, "world_size": world, "preset": cfg.preset.get("name"), "lr": stage.lr,
        "seq_len": cfg.data.seq_len, "index": index,
        "parameters": params, "trainable_parameters": trainable,
        "tokens_per_step": tokens_step, "steps": stage.steps, "tokens_in_stage": tokens_step * stage.steps,
        "gradient_accumulation": stage.global_batch // (stage.micro_batch * world),
        "memory_per_gpu_bytes": {f"zero{z}": memory_per_gpu(params["total"], trainable, world, z, bf16)
                                 for z in ZERO_STAGES},
        "flops_per_token": flops_per_token(config, params, cfg.data.seq_len, index["index_topk"], G, D),
    }


def format_plan(plan: dict) -> str:
    gib = 2**30
    p = plan["parameters"]
    lines = [
        f"[plan] stage {plan['stage']} on {plan['world_size']} GPU(s); preset {plan['preset']}, lr {plan['lr']:g}, "
        f"{plan['seq_len']:,}-token sequences, indexer {plan['index']['index_n_heads']} x "
        f"{plan['index']['index_head_dim']}, top-{plan['index']['index_topk']}",
        f"[plan] parameters: {p['total']:,} ({p['backbone']:,} backbone + {p['indexer']:,} indexer); "
        f"trained: {plan['trainable_parameters']:,}; active per token (matmuls): {p['active_matmul']:,}",
        f"[plan] tokens per step: {plan['tokens_per_step']:,}",
        f"[plan] tokens in stage: {plan['tokens_in_stage']:,} ({plan['steps']:,} steps)",
        f"[plan] gradient accumulation: {plan['gradient_accumulation']}",
    ]
    for zero, m in plan["memory_per_gpu_bytes"].items():
        lines.append(f"[plan] {zero}: weights {m['weights'] / gib:,.2f} GiB, gradients {m['gradients'] / gib:,.2f} GiB,"
                     f" optimizer {m['optimizer'] / gib:,.2f} GiB per GPU")
    f = plan["flops_per_token"]
    lines.append(f"[plan] training FLOPs per token: base {f['base']:.4g}, warmup {f['warmup']:.4g}, "
                 f"sparse {f['sparse']:.4g}")
    return "\n".join(lines)

